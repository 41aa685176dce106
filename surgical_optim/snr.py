"""Gradient signal-to-noise estimators used by ``AutoSNR``.

Two families, kept apart on purpose:

* **Over samples** (the statistically meaningful one, our default): given K gradient samples of a
  tensor (mini-batch gradients of K steps, or per-example gradients of one calibration batch), per
  element ``snr = mean^2 / var`` across the samples (unbiased variance), reduced per tensor by the
  mean over elements. To keep this finite and scale-free, the element's own ``eps * mean^2`` is
  added to the variance, which caps each element at ``1 / eps``; an element whose mean is exactly 0
  has SNR 0. Nothing depends on the gradients' absolute scale.
* **The official code's "eb-criterion"** (``official_eb_criterion``), for faithful reproduction only:
  ``mean(g^2 / (var(g, dim=0) + 1e-8))`` of the *batch-mean* gradient ``g``, with the variance taken
  over the tensor's first axis (not over samples), averaged over batches and compared with a raw
  threshold (0.95 in the code) without normalisation. It is scale-dependent (the ``1e-8``) and its
  "variance" mixes different output units; tensors whose first axis has length 1 give NaN, which
  the code's ``v < 0.95`` test keeps trainable, and so do we.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = [
    "DEFAULT_EPS",
    "snr_from_moments",
    "snr_sums_from_moments_",
    "official_eb_criterion",
    "per_example_gradient_snr",
    "normalise_snr",
]

#: relative variance floor: caps each element's SNR at 1 / DEFAULT_EPS
DEFAULT_EPS = 1e-6


def snr_sums_from_moments_(
    sums: Sequence[torch.Tensor],
    sums_of_squares: Sequence[torch.Tensor],
    counts: Sequence[int],
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tensor, the sum over elements of the element SNR and the number of elements.

    **Consumes its inputs**: the moment buffers are overwritten (they are thrown away after an
    estimate anyway), so the estimate needs no parameter-sized temporaries and runs as a handful of
    foreach passes. Sums (not means) so that shards of one tensor can be added up before dividing.
    Tensors with fewer than 2 samples (no variance estimate) contribute 0. Both vectors are float64
    if any input is, else float32, on the first tensor's device; no host synchronisation (host
    numbers reach the device only as kernel arguments).
    """
    device = sums[0].device if sums else torch.device("cpu")
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in sums) else torch.float32
    usable = [i for i, count in enumerate(counts) if count >= 2]
    means = [sums[i] for i in usable]  # becomes mean, then mean^2, then the element SNR
    spread = [sums_of_squares[i] for i in usable]  # becomes the variance floor-adjusted denominator
    k = [float(counts[i]) for i in usable]
    if means:
        torch._foreach_div_(means, k)
        # variance = (sum of squares - K mean^2) / (K - 1), clamped at 0 against rounding
        for buffer, mean, count in zip(spread, means, k):
            buffer.addcmul_(mean, mean, value=-count)
        torch._foreach_div_(spread, [count - 1.0 for count in k])
        torch._foreach_clamp_min_(spread, 0.0)
        # denominator = variance + eps * mean^2 (caps an element at 1/eps, scale-free)
        torch._foreach_addcmul_(spread, means, means, eps)
        torch._foreach_mul_(means, means)
        torch._foreach_div_(means, spread)  # mean^2 / denominator; 0/0 where the mean is 0
        for ratio in means:
            torch.nan_to_num_(ratio, nan=0.0)
    ratio_sums = [torch.zeros((), device=device, dtype=dtype) for _ in counts]
    for i, ratio in zip(usable, means):
        ratio_sums[i] = ratio.sum(dtype=dtype).to(device)
    sizes = [torch.full((), float(t.numel()), device=device, dtype=dtype) for t in sums]
    if not ratio_sums:
        return torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=dtype)
    return torch.stack(ratio_sums), torch.stack(sizes)


def snr_from_moments(
    sums: Sequence[torch.Tensor],
    sums_of_squares: Sequence[torch.Tensor],
    counts: Sequence[int],
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Per-tensor SNR (mean over elements of the element SNR) from running sums of K samples.

    Consumes its inputs, like ``snr_sums_from_moments_``."""
    ratio_sums, sizes = snr_sums_from_moments_(sums, sums_of_squares, counts, eps)
    return ratio_sums / torch.clamp(sizes, min=1.0)


def official_eb_criterion(grad: torch.Tensor) -> torch.Tensor:
    """The official code's per-batch statistic for one tensor (see the module docstring).

    A sparse gradient is taken as the dense gradient it stands for (zeros in the untouched rows):
    the statistic mixes all rows, so it needs them all (a parameter-sized temporary)."""
    if grad.layout != torch.strided:
        grad = grad.to_dense()
    g = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad  # sync-ok: a dtype cast, not a host read
    if g.dim() == 0 or g.shape[0] < 2:
        return torch.full((), float("nan"), device=g.device, dtype=g.dtype)
    variance = torch.var(g, dim=0, keepdim=True)
    return (g * g / (variance + 1e-8)).mean()


def normalise_snr(raw: torch.Tensor) -> torch.Tensor:
    """Divide by the largest finite value so the result lies in [0, 1]; non-finite values become 0."""
    finite = torch.isfinite(raw)
    cleaned = torch.where(finite, raw, torch.zeros_like(raw)).clamp(min=0.0)
    largest = cleaned.amax() if cleaned.numel() else cleaned.new_zeros(())
    return cleaned / torch.clamp(largest, min=torch.finfo(cleaned.dtype).tiny)


@contextlib.contextmanager
def _dense_embedding_gradients(model: torch.nn.Module) -> Iterator[None]:
    """Embeddings with ``sparse=True`` give dense gradients for a while: ``vmap`` cannot batch sparse
    tensors, and a sparse gradient stands for the dense one anyway (zeros in the untouched rows)."""
    switched = [
        m for m in model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse
    ]
    try:
        for module in switched:
            module.sparse = False
        yield
    finally:
        for module in switched:
            module.sparse = True


def per_example_gradient_snr(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: Sequence[torch.Tensor] | None = None,
    *,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Raw per-tensor SNR across the per-example gradients of one calibration batch.

    Per-example gradients come from ``torch.func.vmap(torch.func.grad(...))`` over
    ``functional_call(model, ...)``; ``loss_fn(output, target)`` must reduce to a scalar for a batch
    of one. BatchNorm layers must be in eval mode (as in surgical fine-tuning; a batch of one has no
    batch statistics). Returns one value per tensor of ``params`` (default: the model's parameters
    that require grad), in that order. Memory: batch size x parameter count, use ``chunk_size`` to
    bound the vmap's working set. Embeddings with ``sparse=True`` give dense per-example gradients
    here (``vmap`` cannot batch sparse ones); their values are the same.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if inputs.shape[0] < 2:
        raise ValueError("per-example SNR needs a calibration batch of at least 2 examples")
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                "per_example_gradient_snr needs BatchNorm layers in eval mode (a batch of one has no "
                "batch statistics): call model.eval() first, as surgical fine-tuning does"
            )
    named = dict(model.named_parameters())
    name_of = {id(p): name for name, p in named.items()}
    if params is None:
        params = [p for p in named.values() if p.requires_grad]
    missing = [i for i, p in enumerate(params) if id(p) not in name_of]
    if missing:
        raise ValueError(
            f"{len(missing)} of the given parameters do not belong to the model (first at position "
            f"{missing[0]}): pass the model whose parameters the optimizer trains"
        )
    names = [name_of[id(p)] for p in params]
    trained = {name: named[name].detach() for name in names}
    buffers = dict(model.named_buffers())

    def loss_of_one(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        output = torch.func.functional_call(model, ({**weights}, buffers), (x.unsqueeze(0),), strict=False)
        return loss_fn(output, y.unsqueeze(0))

    with _dense_embedding_gradients(model):
        per_example = torch.func.vmap(
            torch.func.grad(loss_of_one), in_dims=(None, 0, 0), chunk_size=chunk_size
        )(trained, inputs, targets)
    count = inputs.shape[0]
    sums = [per_example[name].sum(0) for name in names]
    squares = [(per_example[name] * per_example[name]).sum(0) for name in names]
    return snr_from_moments(sums, squares, [count] * len(names), eps=eps)
