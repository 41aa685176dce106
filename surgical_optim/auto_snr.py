"""Auto-SNR: freeze the tensors whose gradient signal-to-noise ratio is low.

Lee et al. (ICLR 2023), section 5: per tensor, a gradient SNR normalised across tensors to [0, 1];
tensors strictly below ``threshold`` are frozen. ``threshold=0`` freezes nothing, and the wrapper is
then exactly the bare optimizer.

Where the gradient samples come from
------------------------------------
* ``estimator="samples"`` (default): the mini-batch gradients of the first ``samples`` steps of the
  ordinary training loop (free: no extra forward or backward). Those steps train every tensor.
  At the end of step ``samples`` the mask is computed on the device.
* ``AutoSNR.calibrate(model, loss_fn, inputs, targets)``: per-example gradients of one calibration
  batch (``torch.func``), before training starts; no free sampling afterwards.
* ``estimator="official_eb"``: the official code's "eb-criterion", for faithful reproduction only
  (see ``surgical_optim.snr``); ``threshold`` is then compared with the raw, un-normalised value.
* ``refresh_every=N`` re-estimates every N steps from the first ``samples`` steps of each period
  (the official code re-estimates every epoch); the previous mask stays in force meanwhile.
* A change of layout - ``add_param_group``, loading a plain inner-optimizer state dict (without
  AutoSNR's key), or editing ``param_groups`` - discards the mask and any ``calibrate()`` result and
  starts over as a new wrapper would: the next ``samples`` steps train every tensor and make a new
  mask (call ``calibrate()`` again to use per-example gradients instead). A full ``state_dict()`` of
  the wrapper restores everything, mask and step count included.

How freezing works
------------------
A frozen tensor's gradient is set to ``None`` before the inner step, so the weight does not move
and its optimizer state does not advance (no weight-decay drift, no momentum). Every parameter stays
in the inner optimizer, so the state_dict layout never changes. Deciding which gradients to drop
needs the mask on the host: it is copied once per estimation (``n`` booleans, issued without
blocking when the estimate is made and read at the next step), never per step.
Sparse gradients (``nn.Embedding(sparse=True)``, with inner SGD, Adagrad or SparseAdam) count as the
dense gradients they stand for, zeros in the untouched rows: the moment buffers are dense, and the
SNR and mask are exactly those of the same model with dense gradients (``official_eb`` and
``calibrate()`` densify too).
``freeze_requires_grad()`` additionally sets ``requires_grad_(False)`` on frozen tensors for the
compute saving; call it between phases only (it breaks DDP's bucket layout and re-estimation).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from ._foreach import gather_plan, local_tensor, statistics_dtype, sum_over_shards
from ._summary import BlockSummary, summarise_blocks
from ._wrapper import OptimizerWrapper
from .snr import (
    DEFAULT_EPS,
    normalise_snr,
    official_eb_criterion,
    per_example_gradient_snr,
    snr_sums_from_moments_,
)

__all__ = ["AutoSNR"]

_ESTIMATORS = ("samples", "official_eb")


class AutoSNR(OptimizerWrapper):
    """Wrap any optimizer and freeze tensors whose normalised gradient SNR is below ``threshold``.

    Args:
        optimizer: the inner optimizer (any ``torch.optim.Optimizer``).
        threshold: in [0, 1]; tensors with normalised SNR strictly below it are frozen. For
            ``estimator="official_eb"`` it is compared with the raw statistic (the code used 0.95).
        samples: number of gradient samples (steps) per estimate; at least 2 (default 5, as the code).
        estimator: ``"samples"`` (default) or ``"official_eb"``.
        refresh_every: re-estimate every N steps (N >= samples); None (default) estimates once.
        eps: relative variance floor of the sample estimator (caps an element's SNR at 1/eps).
    """

    _state_key = "surgical_optim.AutoSNR"

    def __init__(
        self,
        optimizer: Optimizer,
        threshold: float = 0.5,
        *,
        samples: int = 5,
        estimator: str = "samples",
        refresh_every: int | None = None,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__(optimizer)
        if estimator not in _ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(_ESTIMATORS)}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise TypeError(f"threshold must be a number in [0, 1], got {threshold!r}")
        if estimator == "samples" and not 0.0 <= threshold <= 1.0:
            raise ValueError(
                f"threshold must be in [0, 1] (it is compared with the SNR normalised to [0, 1]), got "
                f"{threshold}; 0 freezes nothing, 1 keeps only the highest-SNR tensor"
            )
        if estimator == "official_eb" and threshold < 0:
            raise ValueError(f"threshold must be >= 0 for the official_eb estimator, got {threshold}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
            raise ValueError(f"samples must be an integer >= 2 (a variance needs two samples), got {samples!r}")
        if refresh_every is not None and (
            isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < samples
        ):
            raise ValueError(
                f"refresh_every must be None or an integer >= samples ({samples}), got {refresh_every!r}"
            )
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        self.threshold = float(threshold)
        self.samples = samples
        self.estimator = estimator
        self.refresh_every = refresh_every
        self.eps = float(eps)
        self._warned_nearly_all_frozen = False
        self._on_layout_change()

    # ------------------------------------------------------------------ layout and state
    def _reset_statistics(self, n: int) -> None:
        # A new layout (an added param group, a plain inner state dict, edited param_groups) voids the
        # mask and any calibrate() result, which covered the old tensors only. Estimation starts over
        # as for a new wrapper: the next `samples` steps train everything and make the new mask.
        # Keeping the old step count instead would, with refresh_every=None, never estimate again.
        self._step_count = 0
        self._calibrated_externally = False
        self._plans: dict = {}
        opts: dict[str, Any] = {"device": self._device, "dtype": self._dtype}
        self._raw_snr = torch.zeros(n, **opts)
        self._mask = torch.ones(n, **opts)
        self._host_mask: list[bool] | None = None  # None: nothing frozen yet
        self._pending_mask: _HostCopy | None = None
        self._reset_accumulators()

    def _reset_accumulators(self) -> None:
        n = len(self._params_cache)
        self._sums: list[torch.Tensor | None] = [None] * n
        self._squares: list[torch.Tensor | None] = [None] * n
        self._counts = [0] * n
        self._eb_sum = torch.zeros(n, device=self._device, dtype=self._dtype)

    # ------------------------------------------------------------------ public views
    def mask(self) -> torch.Tensor:
        """1 = trained, 0 = frozen, one entry per parameter in ``param_groups`` order (a copy)."""
        return self._mask.clone()

    def snr(self) -> torch.Tensor:
        """The SNR the mask is based on: normalised to [0, 1] (raw for ``official_eb``)."""
        if self.estimator == "official_eb" and not self._calibrated_externally:
            return self._raw_snr.clone()
        return normalise_snr(self._raw_snr)

    def raw_snr(self) -> torch.Tensor:
        """Un-normalised per-tensor SNR of the last estimate (0 before any estimate)."""
        return self._raw_snr.clone()

    @property
    def calibrated(self) -> bool:
        """Whether a mask has been estimated (it may still be waiting to be applied)."""
        return self._host_mask is not None or self._pending_mask is not None

    def frozen_fraction(self) -> float:
        """Fraction of parameters (elements) frozen by the current mask (syncs; not for the hot path)."""
        params = self.params()
        mask = self._mask.detach().cpu()  # sync-ok: reporting helper, not step()
        total = sum(p.numel() for p in params)
        frozen = sum(p.numel() for p, m in zip(params, mask) if m == 0)
        return frozen / total if total else 0.0

    def block_summary(self) -> BlockSummary:
        """Per param group: tensors, elements, how many are trained (not frozen) and the mean and
        max SNR (as ``snr()``); ``print()`` shows a table (syncs; not for the hot path)."""
        mask = self._mask.detach().cpu()  # sync-ok: reporting helper, not step()
        snr = self.snr().detach().cpu()  # sync-ok: reporting helper, not step()
        trained = [m != 0 for m in mask.tolist()]  # sync-ok: host tensor
        return summarise_blocks(self._named_groups(), snr, trained, score="snr")

    # ------------------------------------------------------------------ estimation
    def _collecting(self) -> bool:
        if self._calibrated_externally:
            return False
        if self.refresh_every is None:
            return self._step_count < self.samples
        return self._step_count % self.refresh_every < self.samples

    def _collect(self, params: list[torch.Tensor]) -> None:
        # local shards under FSDP2: moments are elementwise, shards are combined when reducing
        present = [(i, local_tensor(p.grad)) for i, p in enumerate(params) if p.grad is not None]
        if self.estimator == "official_eb":
            if any(local_tensor(p) is not p for p in params):
                raise NotImplementedError(
                    "estimator='official_eb' reproduces the official single-device code; it does not "
                    "support sharded (FSDP2) parameters - use the default estimator"
                )
            for i, g in present:  # a few scalar kernels per tensor, during calibration only
                self._eb_sum[i].add_(official_eb_criterion(g).to(self._dtype))
                self._counts[i] += 1
            return
        targets_sum: list[torch.Tensor] = []
        targets_sq: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        for i, g in present:
            total, total_sq = self._sums[i], self._squares[i]
            if total is None or total_sq is None:
                dtype = statistics_dtype(g.dtype)
                # dense buffers even for a sparse gradient
                total = self._sums[i] = torch.zeros_like(g, dtype=dtype, layout=torch.strided)
                total_sq = self._squares[i] = torch.zeros_like(g, dtype=dtype, layout=torch.strided)
            self._counts[i] += 1
            if g.layout != torch.strided:
                _add_sparse_moments_(total, total_sq, g)
                continue
            targets_sum.append(total)
            targets_sq.append(total_sq)
            sources.append(g if g.dtype == total.dtype else g.to(total.dtype))
        if sources:
            torch._foreach_add_(targets_sum, sources)
            torch._foreach_addcmul_(targets_sq, sources, sources)

    # Host-side bookkeeping that runs once per estimate: kept out of torch.compile graphs (dynamo
    # would otherwise trace the host copy and the Python state it resets).
    @torch.compiler.disable
    def _finish_estimate(self) -> None:
        if self.estimator == "official_eb":
            # mean over the batches that had a gradient; NaN where none had (host counts: no copy)
            missing = torch.full((), float("nan"), device=self._device, dtype=self._dtype)
            raw = torch.stack(
                [self._eb_sum[i] / count if count else missing for i, count in enumerate(self._counts)]
            )
            self._raw_snr.copy_(raw)
            keep = ~(raw < self.threshold)  # NaN is kept, as the code's `v < 0.95` test does
        else:
            zero = torch.zeros((), device=self._device, dtype=self._dtype)
            sums = [s if s is not None else zero for s in self._sums]
            squares = [s if s is not None else zero for s in self._squares]
            ratio_sums, sizes = snr_sums_from_moments_(sums, squares, self._counts, eps=self.eps)
            # sharded tensors: add the shards' sums and sizes over the mesh (one all-reduce)
            plan = gather_plan(self._plans, (), self._params_cache, self._device)
            ratio_sums, sizes = sum_over_shards(plan, [ratio_sums.to(self._dtype), sizes.to(self._dtype)])
            raw = ratio_sums / torch.clamp(sizes, min=1.0)
            self._raw_snr.copy_(raw)
            keep = normalise_snr(raw) >= self.threshold
        self._mask.copy_(keep.to(self._dtype))
        self._pending_mask = _HostCopy(keep)
        self._reset_accumulators()

    @torch.no_grad()
    def calibrate(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Estimate the mask now from per-example gradients of one batch (before training).

        Every optimizer parameter must belong to ``model``. Disables the free sampling of the first
        steps. Returns the mask. May synchronise (it is not the hot path).
        """
        if self.estimator != "samples":
            raise ValueError("calibrate() estimates SNR over examples; it needs estimator='samples'")
        params = self.params()
        with torch.enable_grad():
            raw = per_example_gradient_snr(
                model, loss_fn, inputs, targets, params, eps=self.eps, chunk_size=chunk_size
            )
        self._raw_snr.copy_(raw.to(self._raw_snr))
        keep = normalise_snr(self._raw_snr) >= self.threshold
        self._mask.copy_(keep.to(self._dtype))
        self._host_mask = [bool(v) for v in keep.cpu()]  # sync-ok: calibrate() runs before training
        self._pending_mask = None
        self._warn_if_nearly_all_frozen(self._host_mask)
        self._calibrated_externally = True
        self._reset_accumulators()
        return self.mask()

    @torch.no_grad()
    def freeze_requires_grad(self) -> int:
        """Set ``requires_grad_(False)`` on frozen tensors (saves their backward). Returns how many.

        Call between phases only: afterwards those tensors get no gradients, so re-estimation and
        DDP's gradient buckets no longer see them.
        """
        keep = self._materialised_host_mask()
        count = 0
        for p, k in zip(self.params(), keep or []):
            if not k and p.requires_grad:
                p.requires_grad_(False)
                p.grad = None
                count += 1
        return count

    def _materialised_host_mask(self) -> list[bool] | None:
        if self._pending_mask is not None:  # once per estimate
            self._take_pending_mask()
        return self._host_mask

    @torch.compiler.disable
    def _take_pending_mask(self) -> None:
        if self._pending_mask is not None:
            self._host_mask = self._pending_mask.result()
            self._pending_mask = None
            self._warn_if_nearly_all_frozen(self._host_mask)

    def _warn_if_nearly_all_frozen(self, keep: list[bool]) -> None:
        """Warn, once per wrapper, when at most one tensor trains (see ``_nearly_all_frozen``).

        Runs where the mask reaches the host anyway (once per estimate), on host booleans and
        parameter sizes: no synchronisation of its own.
        """
        if getattr(self, "_warned_nearly_all_frozen", False) or not _nearly_all_frozen(keep):
            return
        self._warned_nearly_all_frozen = True
        sizes = [p.numel() for p in self._params_cache]
        frozen = sum(n for n, k in zip(sizes, keep) if not k) / max(sum(sizes), 1)
        if self.estimator == "official_eb":
            setting = f"threshold={self.threshold:g}, estimator='official_eb'"
            cause, statistic = "the official statistic is compared raw with the threshold.", "statistic"
        else:
            setting = f"threshold={self.threshold:g}"
            cause = (
                "only the tensor with the largest SNR trains: every SNR is divided by the largest, "
                "and one tensor far above the rest pushes all others under the threshold."
            )
            statistic = "normalised SNR"
        warnings.warn(
            f"AutoSNR({setting}) froze {100 * frozen:.2f}% of the parameters ({len(keep) - sum(keep)} "
            f"of {len(keep)} tensors): {cause} print(optimizer.block_summary()) shows each block's "
            f"{statistic} and optimizer.frozen_fraction() the frozen share; choose a lower threshold, "
            f"below the {statistic} of the blocks that should train (0 trains everything).",
            UserWarning,
            stacklevel=_stacklevel_of_caller(),
        )

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss, inner_closure = self._evaluate_closure(closure)
        params = self._current_params()
        # A mask estimated at the previous step takes effect now.
        keep = self._materialised_host_mask()
        collecting = self._collecting()
        if collecting:
            self._collect(params)
        if keep is not None:
            for p, k in zip(params, keep):
                if not k:
                    p.grad = None  # neither the weight nor its optimizer state may move
        out = self._inner_step(inner_closure)
        self._step_count += 1
        if collecting and not self._collecting():
            self._finish_estimate()
        return loss if closure is not None else out

    # ------------------------------------------------------------------ checkpointing
    def _wrapper_state(self) -> dict[str, Any]:
        # the host mask is materialised so a resumed run applies the same mask at the same step
        keep = self._host_mask
        pending = self._pending_mask.result() if self._pending_mask is not None else None
        return {
            "step_count": self._step_count,
            "calibrated_externally": self._calibrated_externally,
            "raw_snr": self._raw_snr.clone(),
            "mask": self._mask.clone(),
            "host_mask": None if keep is None else list(keep),
            "pending_mask": pending,
            "sums": [None if s is None else s.clone() for s in self._sums],
            "squares": [None if s is None else s.clone() for s in self._squares],
            "counts": list(self._counts),
            "eb_sum": self._eb_sum.clone(),
        }

    def _load_wrapper_state(self, state: dict[str, Any]) -> None:
        # sizes and shapes were checked against the parameters before anything was loaded
        self._step_count = int(state["step_count"])
        self._calibrated_externally = bool(state["calibrated_externally"])
        self._raw_snr.copy_(state["raw_snr"].to(self._raw_snr))
        self._mask.copy_(state["mask"].to(self._mask))
        self._host_mask = None if state["host_mask"] is None else list(state["host_mask"])
        self._pending_mask = None if state["pending_mask"] is None else _HostCopy.ready(state["pending_mask"])
        params = self._params_cache
        self._sums = [None if s is None else s.to(p.device) for s, p in zip(state["sums"], params)]
        self._squares = [None if s is None else s.to(p.device) for s, p in zip(state["squares"], params)]
        self._counts = list(state["counts"])
        self._eb_sum.copy_(state["eb_sum"].to(self._eb_sum))


def _stacklevel_of_caller() -> int:
    """The ``warnings.warn`` stacklevel, for a warning raised by its caller, of the first frame
    outside this package and torch (the user's ``optimizer.step()``, through torch's wrappers)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


_INTERNAL_DIRS = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def _nearly_all_frozen(keep: list[bool]) -> bool:
    """Whether a mask has frozen everything it could: at most one of two or more tensors trains.

    The SNR is normalised by the largest, so the tensor with the largest SNR always passes a
    threshold <= 1; a mask keeping that one alone means the threshold pushed every other tensor
    under it (the typical cause: one tensor, such as a LayerNorm weight, with an SNR far above
    the rest). A share of elements could not tell this from a surgical choice: the last layer of
    the paper's WRN-28-10, weight and bias, is 0.018% of its parameters.
    """
    return len(keep) >= 2 and sum(keep) <= 1


def _add_sparse_moments_(total: torch.Tensor, total_sq: torch.Tensor, grad: torch.Tensor) -> None:
    """Add a sparse gradient and its elementwise square into dense moment buffers.

    A sparse gradient is the dense gradient with zeros in the untouched rows, so the moments are
    exactly the dense gradient's. Repeated indices (an embedding row looked up twice) must be summed
    before squaring, hence the coalesce; on accelerators it waits for the count of distinct indices,
    as the sparse optimizers (Adagrad, SparseAdam) do at every step, but here on collection steps only.
    """
    if grad.layout != torch.sparse_coo:  # other sparse layouts: rare, densify
        dense = grad.to_dense().to(total.dtype)
        total.add_(dense)
        total_sq.addcmul_(dense, dense)
        return
    g = grad.coalesce()
    indices, values = g.indices(), g.values().to(total.dtype)
    # the indices come from a coalesced tensor: valid, no need to check them again
    for buffer, added in ((total, values), (total_sq, values * values)):
        buffer.add_(torch.sparse_coo_tensor(indices, added, g.shape, is_coalesced=True, check_invariants=False))


class _HostCopy:
    """A device bool vector copied to the host without blocking; read it later with ``result()``.

    On CUDA the copy goes to pinned memory and an event marks its completion; by the next step it has
    long finished, so waiting on the event costs nothing. On the CPU it is a plain copy.
    """

    def __init__(self, values: torch.Tensor | None) -> None:
        self._event = None
        self._ready: list[bool] | None = None
        if values is None:
            return
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values.to("cpu", copy=True)

    @classmethod
    def ready(cls, values: list[bool]) -> _HostCopy:
        copy = cls(None)
        copy._ready = list(values)
        return copy

    def result(self) -> list[bool]:
        if self._ready is None:
            if self._event is not None:
                self._event.synchronize()
            # numpy() of a host tensor: no device involved any more
            self._ready = [bool(v) for v in self._host.numpy()]
        return list(self._ready)
