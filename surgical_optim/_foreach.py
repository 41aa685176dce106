"""Batched per-tensor statistics without host synchronisation.

Tensors are grouped by (device, dtype) and reduced with ``torch._foreach_*`` kernels, as
``torch.nn.utils.clip_grad_norm_`` does; results are gathered into one 1-D tensor on one device.
Index tensors used for the gather are cached by the caller, so a steady-state step allocates no
host->device copies either.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = ["statistics_dtype", "GatherPlan", "gather_plan", "per_tensor_sq_norms"]


def statistics_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 if any tensor is float64 (so double-precision runs stay exact), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class GatherPlan:
    """How to turn per-(device, dtype) groups back into one vector in the caller's order."""

    def __init__(self, tensors: Sequence[torch.Tensor], device: torch.device) -> None:
        grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
        self.groups: list[tuple[torch.device, torch.dtype, list[int]]] = []
        order: list[int] = []
        for (dev, dtype), (_, indices) in grouped.items():
            self.groups.append((dev, dtype, list(indices)))
            order.extend(indices)
        # position of each caller index inside the concatenation of the groups
        inverse = [0] * len(order)
        for position, index in enumerate(order):
            inverse[index] = position
        self.inverse = torch.tensor(inverse, dtype=torch.long, device=device)
        # per group, its members' positions in the caller's order (to pick per-tensor weights)
        self.group_index = [
            torch.tensor(indices, dtype=torch.long, device=device) for _, _, indices in self.groups
        ]
        self.device = device
        self.single_group_in_order = len(self.groups) == 1 and order == list(range(len(order)))


def gather_plan(
    cache: dict, key: tuple, tensors: Sequence[torch.Tensor], device: torch.device
) -> GatherPlan:
    plan = cache.get(key)
    if plan is None:
        if len(cache) > 64:  # gradients present/absent patterns rarely vary; bound the cache anyway
            cache.clear()
        plan = cache[key] = GatherPlan(tensors, device)
    return plan


def per_tensor_sq_norms(
    plan: GatherPlan, lists: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype
) -> list[torch.Tensor]:
    """For each list of tensors (laid out as the plan's tensors), the squared L2 norm of each tensor.

    Squared norms (not norms) because they add across shards and micro-batches. Returns one
    1-D ``dtype`` tensor per input list, on ``plan.device``, in the caller's order.
    """
    outputs: list[list[torch.Tensor]] = [[] for _ in lists]
    for dev, tensor_dtype, indices in plan.groups:
        for out, tensors in zip(outputs, lists):
            group = [tensors[i] for i in indices]
            if tensor_dtype == dtype:
                norms = torch._foreach_norm(group, 2)
            else:
                norms = torch._foreach_norm(group, 2, dtype=dtype)
            stacked = torch.stack(norms)
            out.append(stacked.to(plan.device, non_blocking=True) if dev != plan.device else stacked)
    results = []
    for out in outputs:
        flat = out[0] if len(out) == 1 else torch.cat(out)
        if not plan.single_group_in_order:
            flat = flat.index_select(0, plan.inverse)
        results.append(flat * flat)
    return results
