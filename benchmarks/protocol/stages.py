"""The model as sequential stages, one per block of the split, and the frozen prefix's activations.

With BatchNorm in eval mode and no data augmentation, the blocks in front of the first trainable one compute
the same activations in every step; the protocol runs them once per split (:func:`prefix_split`) and trains
only the rest. The stages come from the model's layout (torchvision-ResNet attributes, or the children of an
``nn.Sequential``), grouped by the block split the protocol was given, so stage ``i`` is block ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from surgical_optim import BlockMatcher, block_names, param_groups_by_block

from .data import Split, to_device

__all__ = ["Stages", "PrefixCache", "split_stages", "forward_stages", "frozen_prefix", "prefix_split"]

Stages = list[tuple[str, nn.Module]]
Activations = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class PrefixCache:
    """Activations of frozen prefixes, keyed by (split key, number of prefix stages); share it across
    :func:`~benchmarks.protocol.finetune` calls on the same model weights, data and block split to compute
    them once."""

    def __init__(self) -> None:
        self._store: dict[tuple[str, int], Activations] = {}

    def get(self, key: tuple[str, int]) -> Activations | None:
        return self._store.get(key)

    def put(self, key: tuple[str, int], value: Activations) -> None:
        self._store[key] = value

    def clear(self) -> None:
        self._store.clear()


def _resnet_layout(model: nn.Module) -> Stages | None:
    """torchvision-ResNet attributes (``conv1``, ``bn1``, ``relu``, optional ``maxpool``, ``layer1``..,
    ``avgpool``, ``fc``) as stages ``stem, layer1.., fc``."""
    if not all(hasattr(model, a) for a in ("conv1", "bn1", "layer1", "fc")):
        return None
    layers = [f"layer{i}" for i in range(1, 5) if hasattr(model, f"layer{i}")]
    stem = [model.conv1, model.bn1, getattr(model, "relu", nn.ReLU())]
    if isinstance(getattr(model, "maxpool", None), nn.Module):
        stem.append(model.maxpool)
    head = [getattr(model, "avgpool", nn.AdaptiveAvgPool2d(1)), nn.Flatten(1), model.fc]
    return [("stem", nn.Sequential(*stem))] + [(n, getattr(model, n)) for n in layers] + [("fc", nn.Sequential(*head))]


def _sequential_layout(model: nn.Module) -> Stages | None:
    """The children of an ``nn.Sequential``: each child with parameters starts a stage; parameter-free
    children (activations, pooling) join the stage before them (or the first stage)."""
    if not isinstance(model, nn.Sequential):
        return None
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
    return [(n, mods[0] if len(mods) == 1 else nn.Sequential(*mods)) for n, mods in stages]


def _group_by_block(model: nn.Module, layout: Stages, matcher: BlockMatcher | None) -> Stages | None:
    """Consecutive layout stages merged into one stage per block of the split, or None when a stage holds
    parameters of two blocks, or the stages do not cover the blocks in order."""
    block_of = {id(p): g["name"] for g in param_groups_by_block(model, matcher, trainable_only=False)
                for p in g["params"]}
    merged: list[tuple[str | None, list[nn.Module]]] = []
    covered: set[int] = set()
    for _, module in layout:
        owners = {block_of.get(id(p)) for p in module.parameters()}
        if len(owners) > 1 or None in owners:
            return None
        covered.update(id(p) for p in module.parameters())
        name = owners.pop() if owners else None  # None: parameter-free, it joins the stage before it
        if merged and (name is None or merged[-1][0] in (None, name)):
            merged[-1] = (merged[-1][0] or name, merged[-1][1] + [module])
        else:
            merged.append((name, [module]))
    if len(covered) != len(block_of) or [n for n, _ in merged] != block_names(model, matcher):
        return None
    return [(n, mods[0] if len(mods) == 1 else nn.Sequential(*mods)) for n, mods in merged]


def split_stages(model: nn.Module, matcher: BlockMatcher | None = None) -> Stages | None:
    """``model`` as sequential stages, one per block of the split ``matcher`` (default: the library's), or
    None if it cannot be split so. The caller checks the composition on a probe batch."""
    layout = _resnet_layout(model) or _sequential_layout(model)
    return None if layout is None else _group_by_block(model, layout, matcher)


def forward_stages(stages: Sequence[tuple[str, nn.Module]], x: torch.Tensor) -> torch.Tensor:
    for _, module in stages:
        x = module(x)
    return x


def frozen_prefix(model: nn.Module, matcher: BlockMatcher | None) -> int:
    """How many leading blocks of the split have no parameter that requires grad (after a method's setup)."""
    count = 0
    for group in param_groups_by_block(model, matcher, trainable_only=False):
        if any(p.requires_grad for p in group["params"]):
            break
        count += 1
    return count


def prefix_split(split: Split, key: str, stages: Stages, k: int, cache: PrefixCache, batch_size: int,
                 device: torch.device, channels_last: bool = False) -> Split:
    """``split`` as the activations after the first ``k`` stages (cached under ``(key, k)``; computed from
    the longest shorter prefix already cached)."""
    if k == 0:
        return split
    cached = cache.get((key, k))
    if cached is None:
        cached = _run_prefix(split, key, stages, k, cache, batch_size, device, channels_last)
        cache.put((key, k), cached)
    return Split(tuple(t for t in cached if t is not None), batch_size)


@torch.no_grad()
def _run_prefix(split: Split, key: str, stages: Stages, k: int, cache: PrefixCache, batch_size: int,
                device: torch.device, channels_last: bool) -> Activations:
    prev = cache.get((key, k - 1)) if k > 1 else None
    start, src = 0, split
    if prev is not None:  # continue from the one-stage-shorter cached prefix
        start, src = k - 1, Split(tuple(t for t in prev if t is not None), batch_size)
    xs, ys, gs = [], [], []
    for xb, yb, gb in src.batches(batch_size, shuffle=False):
        xs.append(forward_stages(stages[start:k], to_device(xb, device, channels_last)))
        ys.append(yb)
        if gb is not None:
            gs.append(gb)
    return torch.cat(xs), torch.cat(ys), torch.cat(gs) if gs else None
