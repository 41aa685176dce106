"""The harness's data: one variant's splits from its loader, and the target splits in the form the protocol
reads (tensors when small enough, which enables the frozen-prefix precompute; else DataLoaders)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..datasets import BenchmarkData, WithGroups, load_dataset
from .config import DataConfig

__all__ = ["load_variant", "make_loader", "prepare_data", "TargetSplits"]


def load_variant(cfg: DataConfig, variant: str) -> BenchmarkData:
    """The data of one variant; ``cfg.seed`` fixes the target splits (the same for every run seed)."""
    kw: dict[str, Any] = dict(cfg.loader_kwargs)
    fam = variant.split("/")[0]
    if fam in ("cifar10c", "imagenet_c"):
        _, corruption, severity = variant.split("/")
        kw.update(corruption=corruption, severity=int(severity), seed=cfg.seed)
        if fam == "cifar10c" and cfg.cifar10_root:
            kw["cifar10_root"] = cfg.cifar10_root
    elif fam in ("living17", "entity30"):
        kw.update(seed=cfg.seed)
        if cfg.breeds_info_dir:
            kw["info_dir"] = cfg.breeds_info_dir
    elif fam == "cifar_flip":
        kw.update(split_seed=cfg.seed)
    else:
        kw.update(seed=cfg.seed)
    return load_dataset(fam, cfg.root, **kw)


def make_loader(ds, batch_size: int, shuffle: bool, workers: int, seed: int = 0) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=g,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


def _materialise(ds: Dataset, workers: int, batch_size: int = 256) -> tuple[torch.Tensor, ...]:
    xs, ys, gs = [], [], []
    for item in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers):
        xs.append(item[0])
        ys.append(torch.as_tensor(item[1]))
        if len(item) > 2:
            gs.append(torch.as_tensor(item[2]))
    out = (torch.cat(xs), torch.cat(ys).long())
    return out + ((torch.cat(gs).long(),) if gs else ())


@dataclass(frozen=True)
class TargetSplits:
    """The target splits in a form ``protocol.finetune`` accepts."""

    train: Any
    val: Any
    test: Any
    #: tensors (reused by every run of the variant; the frozen prefix can be precomputed), else DataLoaders
    in_memory: bool


def prepare_data(data: BenchmarkData, *, seed: int, batch_size: int, eval_batch_size: int, workers: int,
                 max_tensor_bytes: int) -> TargetSplits:
    """Tensors when the three splits fit in ``max_tensor_bytes``, else DataLoaders with worker processes (the
    training loader shuffled with a generator seeded by the run seed)."""
    splits = [data.target_train, data.target_val, data.target_test]
    if data.num_groups:
        splits = [WithGroups(s) for s in splits]
    n = sum(len(s) for s in splits)
    nbytes = n * math.prod(data.input_size) * 4
    if nbytes <= max_tensor_bytes:
        return TargetSplits(*(_materialise(s, workers) for s in splits), in_memory=True)
    g = torch.Generator().manual_seed(seed)
    pin = torch.cuda.is_available()
    train = DataLoader(splits[0], batch_size=batch_size, shuffle=True, generator=g, num_workers=workers,
                       pin_memory=pin)
    val, test = (DataLoader(s, batch_size=eval_batch_size, shuffle=False, num_workers=workers, pin_memory=pin)
                 for s in splits[1:])
    return TargetSplits(train, val, test, in_memory=False)
