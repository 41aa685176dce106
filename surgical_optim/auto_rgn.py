"""Auto-RGN: a per-tensor learning rate proportional to the relative gradient norm.

Lee et al. (ICLR 2023), section 5: for each tensor, ``RGN = ||g||_2 / ||theta||_2``; the multiplier is
RGN divided by the largest RGN among the optimizer's tensors, so it lies in [0, 1]; the tensor's
learning rate is ``base lr x multiplier``.

How the multiplier is applied
-----------------------------
Not through ``group["lr"]`` (schedulers own it) and not by scaling the gradient (Adam is invariant to
that). Two paths (``update=``), equal up to rounding:

* ``"scaled_step"`` (any optimizer): snapshot each parameter, let the inner optimizer take its
  ordinary step, then scale the step by the multiplier, moving the parameter back towards the
  snapshot::

      p <- p_old + m * (p_new - p_old)        (torch.lerp, exact at m = 0 and m = 1)

  For every optimizer whose update is linear in the learning rate given its state (SGD with
  momentum, Nesterov and weight decay, Adam, AdamW, RMSprop, Adagrad with ``lr_decay=0``, Lion, ...)
  this equals running the inner optimizer with learning rate ``m x lr`` for that tensor, and the
  optimizer state advances exactly as it would have. The cost is one parameter-sized snapshot
  buffer, allocated once and reused.
* ``"per_tensor_lr"`` (torch's SGD, Adam, AdamW): run their update here with learning rate
  ``lr x m`` per tensor - the multiplier folded into the update - on the inner optimizer's own state
  (``_fold.py``): no buffer and two fewer passes over the parameters. The inner optimizer's
  state-creating first step and steps with hooks on the inner optimizer take the scaled-step path.

Edge cases (chosen so that multipliers are always finite and in [0, 1])
--------------------------------------------------------------------
* A tensor whose weight norm is 0 (zero-initialised layers, fresh biases) has an unbounded RGN (as
  has one whose ratio exceeds the float range). It gets multiplier 1 when its gradient is non-zero (any step is infinitely large relative to it, and
  freezing it would stop a zero-initialised head from ever learning), and it does not take part in
  the max, so it cannot squash every other tensor's multiplier to 0.
* A tensor whose gradient is non-finite gets multiplier 0 and does not take part in the max; its
  gradient's non-finite entries are replaced by 0 before the inner step, so the inner optimizer's
  state stays finite, and the parameter keeps its exact value (restored from the snapshot, or left
  alone by the folded update, where ``m = 0`` is an exact no-op).
* If every gradient is zero, every multiplier is 0 (nothing to learn from).
* Before the first step every multiplier reads 1 (no tensor scaled yet); the first step's own
  gradients set the multipliers that step uses, so this value never scales an update.
* Tensors without a gradient this step are left to the inner optimizer (which skips them); they
  count as RGN 0 in the current window and, between refreshes, keep their multiplier.

The normaliser (``quantile``, ``max_over``, ``per``)
-------------------------------------------------
By default (the paper's rule) each multiplier is ``RGN / max RGN``. The tensors that *take part* in
the normaliser are those with a gradient, not excluded, with a finite gradient and a bounded RGN
(the zero-weight and non-finite cases above take no part); with ``refresh_every > 1``, those that
took part at any step of the window, with their RGN averaged over the window as above.

* ``quantile=q < 1``: the normaliser is ``Q``, the q-quantile of the RGNs taking part (as
  ``torch.quantile``, linear interpolation), and the multiplier is ``min(1, RGN / Q)``: the tensors
  above ``Q`` saturate at 1, so a few tensors with a tiny norm (a zero-initialised bias once it has
  moved, fresh LoRA B matrices) cannot squash every other multiplier. ``Q = 0`` (when none takes
  part, or at least that share of the RGNs is 0) gives 1 to a positive RGN and 0 to an RGN of 0
  (0/0 -> 0, as when every gradient is zero).
* ``max_over="matrices"``: only tensors with at least 2 dimensions set ``Q`` (as LARS and LAMB leave
  biases and norm weights out); 1-D and 0-D tensors still get ``min(1, RGN / Q)``. When no tensor
  with 2 or more dimensions takes part, every tensor taking part sets ``Q``.
* ``per="group"``: one RGN per param group, ``||g|| / ||theta||`` of the concatenation of its
  tensors that have a gradient and are not excluded (from the per-tensor norms: the square root of
  the sum of their squares, computed scaled so that it neither under- nor overflows). The edge
  cases above hold per group: a group whose weight norm is 0 (every tensor of it zero) with a
  non-zero gradient gets 1; a group with a non-finite gradient in any of its tensors gets 0 and
  takes no part; a group without any gradient this step counts as RGN 0. The normaliser is taken
  over groups (for ``max_over="matrices"``, groups holding a non-excluded tensor with at least 2
  dimensions), and every tensor of the group reads the group's multiplier, excluded tensors
  aside, which read 0.

The statistics are computed from whole-tensor norms, after the shards of FSDP2/HSDP parameters
have been combined, so every rank takes the same quantile of the same vector.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from ._fold import FoldLayout, fold_ready, fold_unsupported_reason, folded_step, is_low_precision
from ._foreach import combine_shard_norms, gather_plan, host_readable, local_norms, local_tensors
from ._summary import BlockMultipliers, BlockSummary, summarise_blocks
from ._wrapper import OptimizerWrapper

__all__ = ["AutoRGN"]

_UPDATES = ("auto", "per_tensor_lr", "scaled_step")
_MAX_OVER = ("all", "matrices")
_PER = ("tensor", "group")
# rescale= was the name of update= up to 0.2: "fold" folded the multiplier into the update
_RESCALE_TO_UPDATE = {"auto": "auto", "fold": "per_tensor_lr", "snapshot": "scaled_step"}


def _rgn(
    grad_norms: torch.Tensor,
    param_norms: torch.Tensor,
    include: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorised RGN with the edge cases of the module docstring.

    Returns ``(rgn, unbounded, takes_part)``: the relative gradient norms (0 where not meaningful),
    a mask of tensors whose RGN is unbounded (zero weight norm, or a ratio beyond the float range)
    with a non-zero finite gradient, and a mask of those that take part in the normaliser (included,
    finite, bounded). On the inputs' device; no host synchronisation.
    """
    grad_finite = torch.isfinite(grad_norms) & torch.isfinite(param_norms)
    ratio = grad_norms / torch.where(param_norms > 0, param_norms, torch.ones_like(param_norms))
    bounded = (param_norms > 0) & torch.isfinite(ratio)
    usable = include & grad_finite
    rgn = torch.where(usable & bounded, ratio, torch.zeros_like(ratio))
    unbounded = usable & ~bounded & (grad_norms > 0)
    return rgn, unbounded, usable & bounded


def _normalise(
    rgn: torch.Tensor, unbounded: torch.Tensor, scale_set: torch.Tensor | None = None, quantile: float = 1.0
) -> torch.Tensor:
    """``min(1, RGN / Q)``, unbounded tensors 1. ``Q`` is the largest RGN (``scale_set`` None: the
    paper's rule, its arithmetic unchanged) or the ``quantile`` of the RGNs in ``scale_set``."""
    if scale_set is None:
        largest = rgn.amax() if rgn.numel() else rgn.new_zeros(())
    else:
        # NaN marks the entries outside the set: nanquantile interpolates over the others alone,
        # with a count that stays on the device; an empty set gives NaN, read as Q = 0
        outside = torch.full_like(rgn, float("nan"))
        largest = torch.nan_to_num(torch.nanquantile(torch.where(scale_set, rgn, outside), quantile), nan=0.0)
    # max(largest, tiny) keeps 0/0 at 0 when every gradient is zero.
    scaled = rgn / torch.clamp(largest, min=torch.finfo(rgn.dtype).tiny)
    scaled = torch.clamp(scaled, 0.0, 1.0)
    return torch.where(unbounded, torch.ones_like(scaled), scaled)


def _scale_set(took_part: torch.Tensor, is_matrix: torch.Tensor, max_over: str) -> torch.Tensor:
    """The entries that set the normaliser: those taking part, restricted to matrices for
    ``max_over="matrices"`` unless no matrix takes part (decided on the device)."""
    if max_over == "all":
        return took_part
    matrices = took_part & is_matrix
    return torch.where(matrices.any(), matrices, took_part)


class _Grouping:
    """Param-group structure for ``per="group"``: each tensor's group (non-empty groups numbered
    densely), each group's first tensor, and which groups hold a non-excluded tensor of 2+ dims."""

    def __init__(self, param_groups: list[dict[str, Any]], excluded: list[bool], device: torch.device) -> None:
        group_of: list[int] = []
        first_member: list[int] = []
        holds_matrix: list[bool] = []
        for group in param_groups:
            if not group["params"]:
                continue
            first_member.append(len(group_of))
            members = range(len(group_of), len(group_of) + len(group["params"]))
            holds_matrix.append(any(p.dim() >= 2 and not excluded[i] for i, p in zip(members, group["params"])))
            group_of.extend([len(first_member) - 1] * len(group["params"]))
        self.count = len(first_member)
        self.group_of = torch.tensor(group_of, dtype=torch.long, device=device)
        self.first_member = torch.tensor(first_member, dtype=torch.long, device=device)
        self.holds_matrix = torch.tensor(holds_matrix, dtype=torch.bool, device=device)


def _group_norm(norms: torch.Tensor, grouping: _Grouping) -> torch.Tensor:
    """Per group, the norm of the concatenation of its tensors from their norms (0 for a tensor that
    does not count): ``s sqrt(sum (n / s)^2)`` with ``s`` the group's largest norm, so that neither
    tiny nor huge norms under- or overflow when squared. NaN for a group with a non-finite norm."""
    finite = torch.isfinite(norms)
    safe = torch.where(finite, norms, torch.zeros_like(norms))
    largest = safe.new_zeros(grouping.count).scatter_reduce_(0, grouping.group_of, safe, "amax")
    divisor = torch.where(largest > 0, largest, torch.ones_like(largest)).index_select(0, grouping.group_of)
    ratio = safe / divisor
    total = largest * torch.sqrt(safe.new_zeros(grouping.count).index_add_(0, grouping.group_of, ratio * ratio))
    non_finite = norms.new_zeros(grouping.count).index_add_(0, grouping.group_of, (~finite).to(norms.dtype)) > 0
    return torch.where(non_finite, torch.full_like(total, float("nan")), total)


def _per_group(
    grad_norms: torch.Tensor, param_norms: torch.Tensor, include: torch.Tensor, grouping: _Grouping
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each tensor's group's gradient norm, weight norm and inclusion (any tensor of it included),
    over the included tensors only: ``_rgn`` then gives every tensor its group's RGN."""
    counted = [torch.where(include, v, torch.zeros_like(v)) for v in (grad_norms, param_norms)]
    members = include.to(grad_norms.dtype)
    group_include = members.new_zeros(grouping.count).index_add_(0, grouping.group_of, members) > 0
    per_group = [_group_norm(v, grouping) for v in counted] + [group_include]
    grad, param, included = (v.index_select(0, grouping.group_of) for v in per_group)
    return grad, param, included


class AutoRGN(OptimizerWrapper):
    """Wrap any optimizer so each tensor's learning rate is ``lr x RGN / max RGN``.

    Args:
        optimizer: the inner optimizer (any ``torch.optim.Optimizer``); it keeps its state, its
            param groups and its learning rate, which schedulers keep driving.
        refresh_every: recompute the multipliers every N steps from the RGN averaged over those N
            steps (the official code averages 5 batches once per epoch). 1 (default) uses each
            step's own gradients. Before the first refresh the multipliers come from the first step.
        exclude: a regex, or an iterable of regexes, matched (``re.search``) against parameter
            names; matching tensors are not trained (their gradient is dropped before the inner
            step, so neither they nor their state move) and do not take part in the max. The
            official code excludes every name containing ``"bn"``. Needs ``model``.
        model: the module whose ``named_parameters()`` give the names for ``exclude``.
        update: how the multipliers reach the update. ``"per_tensor_lr"`` runs torch's
            SGD/Adam/AdamW update here with learning rate ``lr x m`` per tensor, on the inner
            optimizer's own state (no buffer, fewer passes over memory); the inner optimizer's
            first step, which creates its state, and any step with hooks or a patched ``step`` on
            the inner optimizer still take the scaled-step path. ``"scaled_step"`` works with any
            optimizer: snapshot the parameters, run the inner step, scale each tensor's step by
            ``m`` (one parameter-sized buffer). The two agree up to rounding. ``"auto"`` (default)
            uses ``"per_tensor_lr"`` where possible.
        rescale: deprecated spelling of ``update`` (``"fold"`` = ``"per_tensor_lr"``,
            ``"snapshot"`` = ``"scaled_step"``).
        quantile: the multiplier is ``min(1, RGN / Q)`` with ``Q`` this quantile (``torch.quantile``,
            linear interpolation) of the RGNs taking part (see the module docstring). 1.0 (default)
            is the largest, the paper's rule; 0.9 lets about a tenth of the tensors saturate at 1,
            so a few tiny or freshly initialised tensors (zero-initialised biases once they move,
            LoRA B matrices) cannot squash every other multiplier. A number in (0, 1].
        max_over: which tensors set ``Q``: ``"all"`` (default) or ``"matrices"``, those with at
            least 2 dimensions (biases and norm weights are left out, as in LARS and LAMB; they
            still get ``min(1, RGN / Q)``). Falls back to all tensors on a step where no matrix
            takes part.
        per: ``"tensor"`` (default): one RGN per tensor. ``"group"``: one RGN per param group,
            ``||g|| / ||theta||`` over the concatenation of its tensors with gradients (excluded
            tensors aside), shared by all its tensors; ``Q`` is taken over groups. With
            ``param_groups_by_block(model)`` this is a per-block statistic.

    Use ``scaler.unscale_(wrapper)`` / ``scaler.step(wrapper)`` with a GradScaler: always pass the
    wrapper, never the inner optimizer, to the scaler.
    """

    _state_key = "surgical_optim.AutoRGN"

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        refresh_every: int = 1,
        exclude: str | Iterable[str] | None = None,
        model: torch.nn.Module | None = None,
        update: str = "auto",
        rescale: str | None = None,
        quantile: float = 1.0,
        max_over: str = "all",
        per: str = "tensor",
    ) -> None:
        super().__init__(optimizer)
        self.quantile, self.max_over, self.per = _check_normaliser(quantile, max_over, per)
        if rescale is not None:
            update = _update_from_rescale(rescale, update)
        if update not in _UPDATES:
            raise ValueError(f"update must be 'auto', 'per_tensor_lr' or 'scaled_step', got {update!r}")
        if update == "per_tensor_lr":
            reason = fold_unsupported_reason(optimizer)
            if reason is not None:
                raise ValueError(
                    f"update='per_tensor_lr' needs torch's own SGD, Adam or AdamW without fused/"
                    f"capturable/differentiable: {reason}. Use update='auto' or 'scaled_step' "
                    "(any optimizer)."
                )
        self.update = update
        # a dict, not a bool attribute: under torch.compile (2.14) an attribute assigned inside a
        # compiled optimizer step did not survive, while dict mutations are replayed
        self._last_step = {"folded": False}
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be an integer >= 1, got {refresh_every!r}")
        self.refresh_every = refresh_every
        self._exclude_patterns = _compile_patterns(exclude)
        if self._exclude_patterns and model is None:
            raise ValueError(
                "exclude= matches parameter names, which the optimizer does not know: pass the model "
                "too, e.g. AutoRGN(opt, exclude='bn', model=model)"
            )
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._param_names = (
            {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
            if model is not None
            else {}
        )
        self._check_patterns_match()
        self._on_layout_change()

    def _check_patterns_match(self) -> None:
        """An ``exclude`` pattern that matches no parameter of the optimizer is a typo or a pattern
        for another model: say so here rather than silently train what it meant to exclude."""
        names = [self._param_names[id(p)] for p in self.params() if id(p) in self._param_names]
        if self._exclude_patterns and not names:
            raise ValueError(
                "exclude= needs the model whose parameters the optimizer holds, but none of the "
                "optimizer's parameters belongs to the model passed as model="
            )
        for pattern in self._exclude_patterns:
            if not any(pattern.search(name) for name in names):
                sample = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
                raise ValueError(
                    f"exclude pattern {pattern.pattern!r} matches no parameter of the optimizer "
                    f"(names look like: {sample}); fix the pattern or drop it"
                )

    # ------------------------------------------------------------------ layout and buffers
    def _reset_statistics(self, n: int) -> None:
        self._excluded = [self._is_excluded(p) for p in self._params_cache]
        self._excluded_mask = torch.tensor(self._excluded, dtype=torch.bool, device=self._device)
        self._is_matrix = torch.tensor([p.dim() >= 2 for p in self._params_cache], device=self._device)
        self._has_complex = any(torch.is_complex(p) for p in self._params_cache)
        self._plans: dict = {}
        # every parameter's positions: the collective's shape is the layout's, not this step's
        self._all_positions = tuple(range(n))
        # snapshot buffers by parameter position, allocated on first use and reused every step
        self._snapshots: dict[int, torch.Tensor] = {}
        opts: dict[str, Any] = {"device": self._device, "dtype": self._dtype}
        self._multipliers = torch.ones(n, **opts)  # nothing scaled before the first step
        self._rgn_sum = torch.zeros(n, **opts)
        self._zero_weight_any = torch.zeros(n, device=self._device, dtype=torch.bool)
        self._took_part_any = torch.zeros(n, device=self._device, dtype=torch.bool)
        self._window_steps = torch.zeros((), **opts)
        self._initialised = torch.zeros((), device=self._device, dtype=torch.bool)

    def _is_excluded(self, p: torch.Tensor) -> bool:
        if not self._exclude_patterns:
            return False
        name = self._param_names.get(id(p))
        if name is None:
            return False
        return any(pattern.search(name) for pattern in self._exclude_patterns)

    def _snapshot_buffers(self, positions: list[int], params: list[torch.Tensor]) -> list[torch.Tensor]:
        buffers = []
        for position, p in zip(positions, params):
            buffer = self._snapshots.get(position)
            if buffer is None or buffer.shape != p.shape or buffer.dtype != p.dtype or buffer.device != p.device:
                buffer = self._snapshots[position] = torch.empty_like(p, memory_format=torch.preserve_format)
            buffers.append(buffer)
        return buffers

    # ------------------------------------------------------------------ public views
    @property
    def last_step_folded(self) -> bool:
        """Whether the last ``step()`` ran the ``"per_tensor_lr"`` update, with the multipliers
        folded into it (``False``: the scaled-step path ran; see ``update``)."""
        return self._last_step["folded"]

    def multipliers(self) -> torch.Tensor:
        """Current multipliers in [0, 1], one per parameter in ``param_groups`` order (a copy);
        all 1 before the first step."""
        return self._multipliers.clone()

    def block_multipliers(self) -> BlockMultipliers:
        """Mean multiplier of each param group, keyed by the group's ``"name"`` (``group<i>`` for
        an unnamed group): 0-d device tensors, made without a host synchronisation, for logging
        every step; ``print()`` shows the values."""
        out = BlockMultipliers()
        start = 0
        for name, group in self._named_groups():
            count = len(group["params"])
            out[name] = self._multipliers[start : start + count].mean()
            start += count
        return out

    def block_summary(self) -> BlockSummary:
        """Per param group: tensors, elements, how many take a step (multiplier > 0) and the mean
        and max multiplier; ``print()`` shows a table (syncs; not for the hot path)."""
        values = self._multipliers.detach().cpu()  # sync-ok: reporting helper, not step()
        trained = [bool(v) for v in (values > 0).tolist()]  # sync-ok: host tensor
        return summarise_blocks(self._named_groups(), values, trained, score="multiplier")

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss, inner_closure = self._evaluate_closure(closure)
        params = self._current_params()

        positions: list[int] = []
        trained: list[torch.Tensor] = []
        any_sparse = False
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            if self._excluded[i]:
                p.grad = None  # neither the weight nor its optimizer state may move
                continue
            positions.append(i)
            trained.append(p)
            any_sparse = any_sparse or p.grad.is_sparse
        if not trained:  # nothing to measure: multipliers stay as they are
            self._last_step["folded"] = False
            # ... but this rank still takes part in the other ranks' all-reduce
            self._combine_shards([], [self._multipliers.new_zeros(0)] * 2)
            return self._inner_step(inner_closure)

        grads = [p.grad for p in trained if p.grad is not None]  # all of them: filtered above
        plan = gather_plan(self._plans, tuple(positions), trained, self._device)
        norms = local_norms(plan, [grads, trained], self._dtype)
        grad_norms, param_norms = self._combine_shards(positions, norms)
        self._update_multipliers(positions, grad_norms, param_norms)
        local = self._multipliers.index_select(0, _plan_index(positions, self._plans, self._device))

        # Non-finite gradient entries -> 0, so the inner optimizer's state stays finite. Their
        # tensors have multiplier 0, so their weights do not move.
        _zero_non_finite(local_tensors(grads, plan.any_dtensor), grad_norms, plan)

        layout = None if any_sparse else self._fold_layout(positions, trained, plan.any_dtensor)
        self._last_step["folded"] = layout is not None
        if layout is not None:
            folded_step(self._inner, layout, trained, local)
            if self._snapshots:  # the first (state-creating) step took the scaled-step path
                self._snapshots.clear()
            return loss

        # snapshots and rescaling work on local shards (FSDP2) - elementwise, so no communication
        trained_local = local_tensors(trained, plan.any_dtensor)
        snapshots = self._snapshot_buffers(positions, trained_local)
        torch._foreach_copy_(snapshots, trained_local)
        out = self._inner_step(inner_closure)
        self._rescale_updates(plan, trained_local, snapshots, local)
        return loss if closure is not None else out

    def _combine_shards(self, positions: list[int], norms: list[torch.Tensor]) -> list[torch.Tensor]:
        """Whole-tensor norms of the trained tensors from their local-shard norms (FSDP2, HSDP).

        The all-reduce runs over a vector of every parameter, with zeros for those without a
        gradient here, and over every shard group of the layout: its shape never depends on which
        gradients this rank has, so ranks that disagree (an unused parameter on one rank) still
        meet in the same collective instead of mismatching or hanging.
        """
        # the plan of every parameter: the same cached plan as a step where all have gradients
        layout_plan = gather_plan(self._plans, self._all_positions, self._params_cache, self._device)
        if layout_plan.sharded is None:
            return norms
        n = self._multipliers.numel()
        index = _plan_index(positions, self._plans, self._device)
        full = [torch.zeros(n, device=self._device, dtype=self._dtype).index_copy_(0, index, v) for v in norms]
        combined = combine_shard_norms(layout_plan, full)
        return [v.index_select(0, index) for v in combined]

    def _fold_layout(
        self, positions: list[int], trained: list[torch.Tensor], any_dtensor: bool
    ) -> FoldLayout | None:
        """The layout for folding this step's update, or None to take the scaled-step path."""
        if self.update == "scaled_step" or self._has_complex or fold_unsupported_reason(self._inner):
            return None
        # group sizes too: the layout maps tensors to their param group's hyperparameters
        key = ("fold", tuple(positions), tuple(len(g["params"]) for g in self.param_groups))
        layout = self._plans.get(key)
        if layout is None:
            layout = self._plans[key] = FoldLayout(self._inner, trained, self._device, any_dtensor)
        return layout if fold_ready(self._inner, layout, trained) else None

    def _update_multipliers(
        self, positions: list[int], grad_norms: torch.Tensor, param_norms: torch.Tensor
    ) -> None:
        n = self._multipliers.numel()
        index = _plan_index(positions, self._plans, self._device)
        full_grad = torch.zeros(n, device=self._device, dtype=self._dtype).index_copy_(0, index, grad_norms)
        full_param = torch.ones(n, device=self._device, dtype=self._dtype).index_copy_(0, index, param_norms)
        include = torch.zeros(n, device=self._device, dtype=torch.bool).index_fill_(0, index, True)
        if self.per == "group":  # every tensor holds its group's norms, so its group's RGN
            full_grad, full_param, include = _per_group(full_grad, full_param, include, self._grouping())
        rgn, zero_weight, took_part = _rgn(full_grad, full_param, include)
        self._rgn_sum.add_(rgn)
        self._zero_weight_any.logical_or_(zero_weight)
        self._took_part_any.logical_or_(took_part)
        self._window_steps.add_(1)
        candidate = self._candidate_multipliers()
        window_done = self._window_steps >= self.refresh_every
        refresh = window_done | ~self._initialised
        # a tensor without a gradient this step contributes RGN 0 to the window; between refreshes
        # it keeps its multiplier (so refresh_every > 1 does not forget sometimes-idle tensors)
        self._multipliers.copy_(torch.where(refresh, candidate, self._multipliers))
        self._rgn_sum.mul_(~window_done)
        self._zero_weight_any.logical_and_(~window_done)
        self._took_part_any.logical_and_(~window_done)
        self._window_steps.mul_(~window_done)
        self._initialised.fill_(True)

    def _candidate_multipliers(self) -> torch.Tensor:
        """The multipliers from the window's mean RGN, normalised as ``quantile``/``max_over``/``per``
        say (the module docstring)."""
        mean_rgn = self._rgn_sum / self._window_steps
        paper_rule = self.quantile == 1.0 and self.max_over == "all"
        if self.per == "tensor":
            scale_set = None if paper_rule else _scale_set(self._took_part_any, self._is_matrix, self.max_over)
            return _normalise(mean_rgn, self._zero_weight_any, scale_set, self.quantile)
        grouping = self._grouping()
        # every tensor of a group holds the group's statistics: its first tensor's stand for it
        rgn, unbounded, took_part = (
            v.index_select(0, grouping.first_member) for v in (mean_rgn, self._zero_weight_any, self._took_part_any)
        )
        scale_set = None if paper_rule else _scale_set(took_part, grouping.holds_matrix, self.max_over)
        per_group = _normalise(rgn, unbounded, scale_set, self.quantile)
        shared = per_group.index_select(0, grouping.group_of)
        return torch.where(self._excluded_mask, torch.zeros_like(shared), shared)

    def _grouping(self) -> _Grouping:
        """The cached param-group structure (keyed by the group sizes, as the fold layout is)."""
        key = ("grouping", tuple(len(g["params"]) for g in self.param_groups))
        grouping = self._plans.get(key)
        if grouping is None:
            grouping = self._plans[key] = _Grouping(self.param_groups, self._excluded, self._device)
        return grouping

    @staticmethod
    def _rescale_updates(
        plan: Any, params: list[torch.Tensor], snapshots: list[torch.Tensor], multipliers: torch.Tensor
    ) -> None:
        """``p <- p_old + m (p_new - p_old)`` per tensor, ``p_old`` the snapshot."""
        for (dev, dtype, indices), index in zip(plan.groups, plan.group_index):
            group_params = [params[i] for i in indices]
            group_snaps = [snapshots[i] for i in indices]
            group_m = multipliers if plan.single_group_in_order else multipliers.index_select(0, index)
            if is_low_precision(dtype):
                # in float32, rounded once: a lerp weight 1 - m rounded to bfloat16 is 1 for
                # m < 0.002, which would freeze the tensor
                updates = torch._foreach_sub([p.float() for p in group_params], group_snaps)  # sync-ok: casts
                torch._foreach_mul_(updates, list(group_m.to(device=dev, dtype=torch.float32, non_blocking=True).unbind(0)))
                torch._foreach_copy_(group_params, group_snaps)
                torch._foreach_add_(group_params, updates)
                continue
            # lerp(p_new, p_old, 1 - m) is exact at m = 0 and m = 1; it wants weights of the
            # parameters' dtype and device
            weights = (1.0 - group_m).to(device=dev, dtype=dtype, non_blocking=True)
            torch._foreach_lerp_(group_params, group_snaps, list(weights.unbind(0)))

    # ------------------------------------------------------------------ checkpointing
    def _wrapper_state(self) -> dict[str, Any]:
        return {
            "refresh_every": self.refresh_every,
            "multipliers": self._multipliers.clone(),
            "rgn_sum": self._rgn_sum.clone(),
            "zero_weight_any": self._zero_weight_any.clone(),
            "took_part_any": self._took_part_any.clone(),
            "window_steps": self._window_steps.clone(),
            "initialised": self._initialised.clone(),
        }

    def _load_wrapper_state(self, state: dict[str, Any]) -> None:
        if "took_part_any" not in state:  # saved by an earlier version: a positive mean RGN took part
            state = {**state, "took_part_any": state["rgn_sum"] > 0}
        for key in ("multipliers", "rgn_sum", "zero_weight_any", "took_part_any", "window_steps", "initialised"):
            target = getattr(self, "_" + key)
            # shapes were checked against the parameters before anything was loaded
            target.copy_(state[key].to(device=target.device, dtype=target.dtype))


def _zero_non_finite(grads: list[torch.Tensor], grad_norms: torch.Tensor, plan: Any) -> None:
    """Replace non-finite gradient entries by 0 (in place).

    A non-finite entry makes its tensor's norm non-finite. On the CPU the norms are read to touch
    only those tensors (usually none), which saves a pass over every gradient; elsewhere every
    gradient goes through ``nan_to_num_``, since choosing would need a host synchronisation.
    """
    if host_readable(grad_norms.device) and all(host_readable(dev) for dev, _, _ in plan.groups):
        suspects = torch.nonzero(~torch.isfinite(grad_norms)).flatten().tolist()  # sync-ok: CPU
        grads = [grads[i] for i in suspects]
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)


def _plan_index(positions: list[int], cache: dict, device: torch.device) -> torch.Tensor:
    """Cached long tensor of ``positions`` on ``device`` (no host->device copy in steady state)."""
    key = ("index", tuple(positions))
    index = cache.get(key)
    if index is None:
        index = cache[key] = torch.tensor(positions, dtype=torch.long, device=device)
    return index


def _check_normaliser(quantile: Any, max_over: Any, per: Any) -> tuple[float, str, str]:
    """The validated ``quantile``, ``max_over`` and ``per`` of ``AutoRGN``."""
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 < quantile <= 1.0:
        raise ValueError(
            f"quantile must be a number in (0, 1], got {quantile!r}: use 1.0 for the paper's rule (the "
            "largest RGN), or e.g. 0.9 so that a few tiny or fresh tensors cannot squash the others"
        )
    if max_over not in _MAX_OVER:
        raise ValueError(f"max_over must be 'all' or 'matrices' (tensors with 2+ dimensions), got {max_over!r}")
    if per not in _PER:
        raise ValueError(f"per must be 'tensor' (one RGN per tensor) or 'group' (one per param group), got {per!r}")
    return float(quantile), max_over, per


def _update_from_rescale(rescale: str, update: str) -> str:
    """The ``update`` a deprecated ``rescale`` value stands for (with a DeprecationWarning)."""
    if update != "auto":
        raise TypeError("pass update= or its deprecated spelling rescale=, not both")
    if rescale not in _RESCALE_TO_UPDATE:
        raise ValueError(f"rescale must be 'auto', 'fold' or 'snapshot', got {rescale!r}; use update=")
    new = _RESCALE_TO_UPDATE[rescale]
    warnings.warn(
        f"AutoRGN(rescale={rescale!r}) is deprecated: use update={new!r} (the multipliers are "
        "applied as a per-tensor learning rate, or by scaling the inner optimizer's step)",
        DeprecationWarning,
        stacklevel=3,
    )
    return new


def _compile_patterns(exclude: str | Iterable[str] | None) -> list[re.Pattern[str]]:
    if exclude is None:
        return []
    if isinstance(exclude, str):
        exclude = [exclude]
    try:
        patterns = list(exclude)
    except TypeError:
        raise TypeError(
            f"exclude must be a regex string or an iterable of them, got {type(exclude).__name__}"
        ) from None
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"exclude patterns must be strings, got {type(pattern).__name__}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"exclude pattern {pattern!r} is not a valid regex: {error}") from None
    return compiled
