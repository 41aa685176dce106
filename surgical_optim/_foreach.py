"""Batched per-tensor statistics without host synchronisation.

Tensors are grouped by (device, dtype) and reduced with ``torch._foreach_*`` kernels, as
``torch.nn.utils.clip_grad_norm_`` does; results are gathered into one 1-D tensor on one device.
Index tensors used for the gather are cached by the caller, so a steady-state step allocates no
host->device copies either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = [
    "host_readable",
    "statistics_dtype",
    "local_tensor",
    "local_tensors",
    "GatherPlan",
    "gather_plan",
    "local_norms",
    "combine_shard_norms",
    "sum_over_shards",
]

try:  # DTensor (FSDP2's sharded parameters) exists only where torch.distributed is built
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-tensor statistics and moment buffers are kept in: float64 for float64 tensors
    (double-precision runs stay exact), float32 otherwise (low precision never accumulates)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing its storage), or the tensor itself."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor._local_tensor
    return tensor


def host_readable(device: torch.device) -> bool:
    """Whether values on ``device`` may be read on the host in ``step()``: only for the CPU in
    eager mode, where there is no device to wait for. Reading them there can save a whole pass
    over memory; on accelerators, and while torch.compile traces, everything stays on the device."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def local_tensors(tensors: Sequence[torch.Tensor], any_dtensor: bool) -> list[torch.Tensor]:
    """``local_tensor`` of each; a plain copy of the list when none is a DTensor (the common case,
    where a per-tensor Python call would cost more than the kernels on small tensors)."""
    return [local_tensor(t) for t in tensors] if any_dtensor else list(tensors)


def _shard_groups(tensor: torch.Tensor) -> tuple:
    """The process groups over which a DTensor's local values must be summed: one per mesh dimension
    along which it is sharded (none for plain or replicated tensors).

    FSDP2 shards each parameter along dim 0 of a 1-D mesh; HSDP's 2-D mesh replicates across one
    dimension and shards along the other, so only the shard dimension's group is summed over (the
    replicas hold identical values). Squared norms of disjoint shards add up to the whole tensor's.
    """
    if DTensor is None or not isinstance(tensor, DTensor):
        return ()
    mesh = tensor.device_mesh
    return tuple(
        mesh.get_group(mesh_dim=dim) for dim, placement in enumerate(tensor.placements) if isinstance(placement, Shard)
    )


class GatherPlan:
    """How to turn per-(device, dtype) groups back into one vector in the caller's order."""

    def __init__(self, tensors: Sequence[torch.Tensor], device: torch.device) -> None:
        per_tensor = [_shard_groups(t) for t in tensors]
        distinct: dict[int, Any] = {}  # in order of first appearance: the same on every rank
        for groups in per_tensor:
            for group in groups:
                distinct.setdefault(id(group), group)
        #: per process group to sum over, the mask of the entries sharded over it
        self.shards: list[tuple[Any, torch.Tensor]] = [
            (group, torch.tensor([group in groups for groups in per_tensor], dtype=torch.bool, device=device))
            for group in distinct.values()
        ]
        #: entries sharded over any group (None without sharded tensors)
        self.sharded = (
            torch.tensor([bool(groups) for groups in per_tensor], dtype=torch.bool, device=device)
            if self.shards
            else None
        )
        local = [local_tensor(t) for t in tensors]
        #: whether any tensor is a DTensor (its local shard must be used for elementwise work)
        self.any_dtensor = any(a is not b for a, b in zip(local, tensors))
        grouped = _group_tensors_by_device_and_dtype([local], with_indices=True)  # type: ignore[list-item]
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


def local_norms(
    plan: GatherPlan, lists: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype
) -> list[torch.Tensor]:
    """For each list of tensors (laid out as the plan's tensors), the L2 norm of each tensor's local
    part (the local shard of a DTensor). No communication.

    Returns one 1-D ``dtype`` tensor per input list, on ``plan.device``, in the caller's order.
    Norms, not squared norms, so that tiny or huge tensors do not under/overflow.
    """
    outputs: list[list[torch.Tensor]] = [[] for _ in lists]
    for dev, tensor_dtype, indices in plan.groups:
        for out, tensors in zip(outputs, lists):
            group = local_tensors([tensors[i] for i in indices], plan.any_dtensor)
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
        results.append(flat)
    return results


def combine_shard_norms(plan: GatherPlan, norms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole-tensor norms from local-shard norms laid out as ``plan``'s tensors: only sharded
    tensors go through squares, to add their shards up over the mesh (one all-reduce per group)."""
    if plan.sharded is None:
        return norms
    squares = sum_over_shards(plan, [r * r for r in norms])
    return [torch.where(plan.sharded, torch.sqrt(sq), r) for sq, r in zip(squares, norms)]


def sum_over_shards(plan: GatherPlan, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum the sharded entries of per-tensor vectors over their shard groups: one all-reduce per
    group for all vectors together (FSDP2 and HSDP: one in all).

    Values of unsharded (plain or replicated) tensors are left as they are. A tensor sharded along
    several mesh dimensions is summed over each in turn, which adds up all its disjoint shards.
    Collectives are asynchronous on the device, so this adds no host synchronisation.
    """
    if not plan.shards or not vectors:
        return vectors
    import torch.distributed as dist

    for group, mask in plan.shards:
        stacked = torch.stack([torch.where(mask, v, torch.zeros_like(v)) for v in vectors])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
        vectors = [torch.where(mask, reduced, v) for reduced, v in zip(stacked.unbind(0), vectors)]
    return vectors
