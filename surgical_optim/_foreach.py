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

__all__ = [
    "host_readable",
    "local_tensor",
    "local_tensors",
    "GatherPlan",
    "gather_plan",
    "per_tensor_norms",
    "sum_over_shards",
]

try:  # DTensor (FSDP2's sharded parameters) exists only where torch.distributed is built
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


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


def _shard_group(tensor: torch.Tensor):
    """The process group over which a DTensor's local values must be summed, or None.

    FSDP2 shards each parameter along dim 0 of a 1-D mesh: squared norms of the local shards add up
    to the squared norm of the whole tensor. Replicated tensors need no reduction.
    """
    if DTensor is None or not isinstance(tensor, DTensor):
        return None
    mesh = tensor.device_mesh
    sharded_dims = [i for i, placement in enumerate(tensor.placements) if isinstance(placement, Shard)]
    if not sharded_dims:
        return None
    if mesh.ndim != 1:
        raise NotImplementedError(
            "surgical_optim supports DTensor parameters sharded over a 1-D device mesh (FSDP2's "
            f"fully_shard); got placements {tensor.placements} on a {mesh.ndim}-D mesh (HSDP)"
        )
    return mesh.get_group()


class GatherPlan:
    """How to turn per-(device, dtype) groups back into one vector in the caller's order."""

    def __init__(self, tensors: Sequence[torch.Tensor], device: torch.device) -> None:
        groups = [_shard_group(t) for t in tensors]
        distinct = {id(g): g for g in groups if g is not None}
        if len(distinct) > 1:
            raise NotImplementedError("sharded parameters must all live on one device mesh")
        #: (process group, mask of sharded entries) when some tensors are DTensor shards
        self.shards = None
        if distinct:
            mask = torch.tensor([g is not None for g in groups], dtype=torch.bool, device=device)
            self.shards = (next(iter(distinct.values())), mask)
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


def per_tensor_norms(
    plan: GatherPlan, lists: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype
) -> list[torch.Tensor]:
    """For each list of tensors (laid out as the plan's tensors), the L2 norm of each tensor.

    Returns one 1-D ``dtype`` tensor per input list, on ``plan.device``, in the caller's order.
    Norms, not squared norms, so that tiny or huge tensors do not under/overflow; only sharded
    tensors go through squares, to add their shards up over the mesh.
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
    if plan.shards is None:
        return results
    _, mask = plan.shards
    squares = sum_over_shards(plan, [r * r for r in results])
    return [torch.where(mask, torch.sqrt(sq), r) for sq, r in zip(squares, results)]


def sum_over_shards(plan: GatherPlan, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum the sharded entries of per-tensor vectors over the shard group: one all-reduce in all.

    Values of unsharded (plain or replicated) tensors are left as they are. Collectives are
    asynchronous on the device, so this adds no host synchronisation.
    """
    if plan.shards is None or not vectors:
        return vectors
    import torch.distributed as dist

    group, mask = plan.shards
    stacked = torch.stack([torch.where(mask, v, torch.zeros_like(v)) for v in vectors])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    return [torch.where(mask, reduced, v) for reduced, v in zip(stacked.unbind(0), vectors)]
