"""Per-tensor learning-rate multipliers folded into torch's own SGD / Adam / AdamW updates.

AutoRGN's general path (snapshot, inner step, lerp back) works for any optimizer but reads and
writes every parameter twice more than the inner step and keeps one parameter-sized buffer. For the
three optimizers most people wrap, the update is short enough to run here with a learning rate per
tensor: the same foreach kernels torch's ``_multi_tensor_*`` functions use, on the inner optimizer's
own state tensors (so its ``state_dict`` is unchanged and checkpoints move freely between the two
paths), with ``lr`` replaced by ``lr x m`` for each tensor:

* SGD:   ``p += (-lr m) d``, ``d`` the (Nesterov) momentum direction with weight decay, as torch's;
* Adam:  ``p += exp_avg / denom'`` with ``denom' = (sqrt(v) / sqrt(bc2) + eps) / (-lr m / bc1)``,
  which is torch's own capturable formulation; ``m = 0`` gives ``denom' = inf`` and an exact no-op;
* AdamW: additionally ``p *= 1 - lr m wd`` (decoupled decay, exactly 1 at ``m = 0``).

The result equals running the inner optimizer with learning rate ``lr x m`` per tensor up to
floating-point rounding (not bit for bit: the multiply order differs). Per-tensor factors are 0-d
device tensors, so nothing is read on the host except torch's own CPU step counters, which
``torch.optim.Adam`` reads in the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from ._foreach import host_readable, local_tensors

__all__ = ["FOLDABLE", "fold_unsupported_reason", "fold_ready", "FoldLayout", "folded_step"]

FOLDABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def fold_unsupported_reason(inner: Optimizer) -> str | None:
    """Why the multipliers cannot be folded into ``inner``'s update, or None when they can.

    Only the plain foreach/for-loop variants of torch's SGD, Adam and AdamW (not subclasses, whose
    update may differ) with Python-number hyperparameters and real parameters qualify.
    """
    if type(inner) not in FOLDABLE:
        return f"{type(inner).__name__} is not exactly torch.optim.SGD, Adam or AdamW"
    # while tracing, torch.compile itself sets capturable=True on the groups it sees (and may move
    # step counters to the parameters' device): that is its rewrite of the same update, not the user's
    flags = ("fused", "differentiable") if torch.compiler.is_compiling() else ("fused", "capturable", "differentiable")
    for index, group in enumerate(inner.param_groups):
        for flag in flags:
            if group.get(flag):
                return f"param group {index} has {flag}=True"
        for key in ("lr", "betas", "momentum", "weight_decay", "eps", "dampening"):
            value = group.get(key)
            values = value if isinstance(value, tuple) else (value,)
            if any(torch.is_tensor(v) for v in values):
                return f"param group {index} has a tensor {key!r}"
    return None


class FoldLayout:
    """The trained tensors split by param group, then by (device, dtype), as foreach kernels want.

    ``chunks``: (group index, indices into the trained list, the same indices as a long tensor on
    the multipliers' device). Built once per set of trained tensors and cached by the caller.
    """

    def __init__(
        self, inner: Optimizer, trained: Sequence[torch.Tensor], device: torch.device, any_dtensor: bool
    ) -> None:
        group_of = {id(p): gi for gi, group in enumerate(inner.param_groups) for p in group["params"]}
        by_group: dict[int, list[int]] = {}
        for i, p in enumerate(trained):
            by_group.setdefault(group_of[id(p)], []).append(i)
        self.chunks: list[tuple[int, list[int], torch.Tensor]] = []
        local_all = local_tensors(trained, any_dtensor)
        #: whether any parameter is a DTensor (FSDP2), as the gather plan found: then state and
        #: gradients are too
        self.any_dtensor = any_dtensor
        #: (id of the inner state dict, its size, what each group needs) when last found complete
        self.ready_for: tuple[Any, ...] | None = None
        for gi, members in sorted(by_group.items()):
            local = [local_all[i] for i in members]
            grouped = _group_tensors_by_device_and_dtype([local], with_indices=True)  # type: ignore[list-item]
            for _, (_, positions) in grouped.items():
                indices = [members[j] for j in positions]
                self.chunks.append((gi, indices, torch.tensor(indices, dtype=torch.long, device=device)))


def fold_ready(inner: Optimizer, layout: FoldLayout, trained: Sequence[torch.Tensor]) -> bool:
    """True when folding may replace ``inner.step()`` this step: the inner optimizer's state for the
    trained tensors exists (its own first step creates it), and no hook or wrapper (a scheduler's step counter, a profiler, torch's global
    optimizer hooks) is attached to the inner step, which folding would skip: with one, the step
    takes the snapshot path, where the inner step and its hooks run as usual. Sparse gradients,
    which the fold's dense kernels cannot take, are the caller's to check (it reads every gradient
    anyway)."""
    if inner._optimizer_step_pre_hooks or inner._optimizer_step_post_hooks or "step" in inner.__dict__:
        return False
    if _global_optimizer_pre_hooks or _global_optimizer_post_hooks:
        return False
    state = inner.state
    # State entries are only added by steps, but which entries a step needs depends on the
    # hyperparameters (SGD's momentum may be switched on mid-run): the cache key holds both.
    key = (id(state), len(state), tuple(_state_needs(inner, group) for group in inner.param_groups))
    if layout.ready_for == key:
        return True
    for gi, indices, _ in layout.chunks:
        needs = _state_needs(inner, inner.param_groups[gi])
        for i in indices:
            entry = state.get(trained[i], {})
            if any(entry.get(name) is None for name in needs):
                return False
            if isinstance(inner, torch.optim.SGD):
                continue
            step = entry.get("step")
            if not torch.is_tensor(step) or (step.device.type != "cpu" and not torch.compiler.is_compiling()):
                return False
    layout.ready_for = key
    return True


def _state_needs(inner: Optimizer, group: dict[str, Any]) -> tuple[str, ...]:
    """The state entries the folded update of ``group`` reads."""
    if isinstance(inner, torch.optim.SGD):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()
    return ("exp_avg", "exp_avg_sq", "step") + (("max_exp_avg_sq",) if group["amsgrad"] else ())


def folded_step(
    inner: Optimizer,
    layout: FoldLayout,
    trained: Sequence[torch.Tensor],
    multipliers: torch.Tensor,
) -> None:
    """One update of ``inner`` (SGD, Adam or AdamW) with learning rate ``lr x multipliers[i]`` for
    ``trained[i]``; every tensor in ``trained`` has a gradient and (see ``fold_ready``) a state."""
    for gi, indices, index in layout.chunks:
        group = inner.param_groups[gi]
        params = [trained[i] for i in indices]
        local_params = local_tensors(params, layout.any_dtensor)
        grads = local_tensors([p.grad for p in params], layout.any_dtensor)  # type: ignore[misc]
        dtype, device = local_params[0].dtype, local_params[0].device
        m = multipliers.index_select(0, index)
        if isinstance(inner, torch.optim.SGD):
            _sgd(group, inner.state, params, local_params, grads, m, dtype, device, layout.any_dtensor)
        else:
            decoupled = isinstance(inner, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))
            _adam(group, inner.state, params, local_params, grads, m, dtype, device, decoupled, layout.any_dtensor)


def _step_value(step: torch.Tensor) -> Any:
    # a CPU counter, read as torch.optim.Adam reads it; traced as a tensor under torch.compile
    return step if torch.compiler.is_compiling() else step.item()  # sync-ok: CPU tensor


def _sgd(group, state, params, local_params, grads, m, dtype, device, any_dtensor: bool) -> None:
    lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        grads = torch._foreach_add(grads, local_params, alpha=weight_decay)
    if momentum != 0:
        bufs = local_tensors([state[p]["momentum_buffer"] for p in params], any_dtensor)
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
        grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
    scales = _factors(m * -lr, device, dtype)
    if is_low_precision(dtype):
        _add_in_float32(local_params, [g.float() for g in grads], scales)  # sync-ok: dtype casts on the device
        return
    torch._foreach_addcmul_(local_params, grads, scales)


def _adam(group, state, params, local_params, grads, m, dtype, device, decoupled: bool, any_dtensor: bool) -> None:
    lr, (beta1, beta2) = group["lr"], group["betas"]
    eps, weight_decay, amsgrad = group["eps"], group["weight_decay"], group["amsgrad"]
    entries = [state[p] for p in params]
    exp_avgs = local_tensors([e["exp_avg"] for e in entries], any_dtensor)
    exp_avg_sqs = local_tensors([e["exp_avg_sq"] for e in entries], any_dtensor)
    steps = [e["step"] for e in entries]
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    torch._foreach_add_(steps, 1)
    if weight_decay != 0:
        if decoupled:
            _decay(local_params, m, lr * weight_decay, device, dtype)
        else:
            grads = torch._foreach_add(grads, local_params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    del grads
    step_values = [_step_value(s) for s in steps]
    if amsgrad:
        max_sqs = local_tensors([e["max_exp_avg_sq"] for e in entries], any_dtensor)
        torch._foreach_maximum_(max_sqs, exp_avg_sqs)
        denom = torch._foreach_sqrt(max_sqs)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in step_values])
    torch._foreach_add_(denom, eps)
    coefficients = [-lr / (1 - beta1**t) for t in step_values]  # torch's step size, times m below
    if is_low_precision(dtype):
        # exp_avg / denom in float32, scaled by the float32 step size, added with one rounding
        ratios = [e.float() for e in exp_avgs]  # sync-ok: dtype casts on the device
        torch._foreach_div_(ratios, denom)
        step_sizes = torch.stack(torch._foreach_mul(list(m.unbind(0)), coefficients))
        _add_in_float32(local_params, ratios, _factors(step_sizes, device, dtype))
        return
    if host_readable(device) and host_readable(m.device):
        # No device to synchronise with: torch's per-tensor-scalar overload reads the step sizes
        # from a CPU tensor (in double, as torch's Python floats), saving a pass over memory; at
        # m = 1 this is torch's own arithmetic.
        step_sizes = m.double() * torch.tensor(coefficients, dtype=torch.float64)
        torch._foreach_addcdiv_(local_params, exp_avgs, denom, step_sizes)
        return
    # On an accelerator the step sizes stay 0-d device tensors and go into the denominator, as in
    # torch's capturable Adam: denom / (-lr m / bc1); m = 0 gives an infinite denominator, a no-op.
    step_sizes = torch._foreach_mul(list(m.unbind(0)), coefficients)
    if m.dtype != dtype or m.device != device:
        step_sizes = list(torch.stack(step_sizes).to(device=device, dtype=dtype, non_blocking=True).unbind(0))
    torch._foreach_div_(denom, step_sizes)
    torch._foreach_addcdiv_(local_params, exp_avgs, denom)


def is_low_precision(dtype: torch.dtype) -> bool:
    """float16, bfloat16 and narrower: dtypes in which a factor such as ``1 - 1e-3`` or a step size
    ``lr x m`` would lose its meaning if it were rounded to the dtype before use."""
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


def _factors(values: torch.Tensor, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per-tensor factors as 0-d tensors on ``device``: in ``dtype`` for float32/64 parameters, in
    float32 for low-precision ones (never rounded to their dtype)."""
    factor_dtype = torch.float32 if is_low_precision(dtype) else dtype
    return list(values.to(device=device, dtype=factor_dtype, non_blocking=True).unbind(0))


def _add_in_float32(params: list[torch.Tensor], updates: list[torch.Tensor], factors: list[torch.Tensor]) -> None:
    """``p += factor x update`` for low-precision ``params``: ``updates`` are float32 temporaries
    (consumed); the sum is formed in float32 (type promotion) and rounded once into ``p``."""
    torch._foreach_mul_(updates, factors)
    torch._foreach_add_(params, updates)


def _decay(params: list[torch.Tensor], m: torch.Tensor, lr_wd: float, device: torch.device, dtype: torch.dtype) -> None:
    """Decoupled weight decay ``p *= 1 - lr wd m`` (exactly 1 at ``m = 0``)."""
    if is_low_precision(dtype):
        # as p + p x (-lr wd m) in float32: 1 - 1e-3 rounded to bfloat16 would be 1 - 4e-3
        _add_in_float32(params, [p.float() for p in params], _factors(m * -lr_wd, device, dtype))  # sync-ok: casts
        return
    torch._foreach_mul_(params, _factors(1 - lr_wd * m, device, dtype))
