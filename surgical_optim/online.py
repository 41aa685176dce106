"""Online adaptation on an unlabeled stream (the paper's test-time setting).

The target data arrive as unlabeled batches; for each batch the model first predicts (that is the
prediction to score), then takes one optimizer step on an unsupervised loss:

* ``entropy``: the mean Shannon entropy of the predicted class distribution (TENT, Wang et al. 2021);
* ``marginal_entropy``: the entropy of the class distribution averaged over augmentations of each
  input (MEMO, Zhang et al. 2022), which the paper uses for its online CIFAR-10-C experiment.

What is tuned is whatever the optimizer holds: ``select_blocks(model, "first")`` for the paper's
surgical variant, or every block under ``AutoRGN``. Normalisation statistics are the caller's choice:
``keep_norm_eval(model)`` keeps them frozen, as the paper does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

__all__ = ["adapt_online", "entropy", "marginal_entropy"]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the entropy of ``softmax(logits)`` (natural log), in float32 or wider."""
    log_p = F.log_softmax(logits.float() if logits.dtype.itemsize < 4 else logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def marginal_entropy(model: nn.Module, inputs: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor], copies: int) -> torch.Tensor:
    """Mean over the batch of the entropy of each input's class distribution averaged over
    ``copies`` augmentations (``augment`` maps a batch to an augmented batch of the same shape)."""
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    logits = torch.stack([model(augment(inputs)) for _ in range(copies)])  # copies x batch x classes
    log_p = F.log_softmax(logits.float() if logits.dtype.itemsize < 4 else logits, dim=-1)
    # log of the mean probability, stably: logsumexp over copies minus log(copies)
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(copies)
    return -(log_mean.exp() * log_mean).sum(-1).mean()


def adapt_online(
    model: nn.Module,
    optimizer: Optimizer,
    batches: Iterable[torch.Tensor],
    *,
    loss: str = "entropy",
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    copies: int = 8,
) -> Iterator[torch.Tensor]:
    """Predict each unlabeled batch, then adapt on it; yields the logits predicted *before* the update.

    ``loss`` is ``"entropy"`` or ``"marginal_entropy"`` (which needs ``augment`` and uses ``copies``
    augmentations per input). A batch whose loss is not finite takes no step: the model and the
    optimizer's state stay exactly as they were (one host read per batch, as reading the predictions
    needs anyway). The caller sets the model's mode first (``keep_norm_eval``).

    Example::

        select_blocks(model, "first")
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for logits in adapt_online(model, opt, stream):
            correct += (logits.argmax(-1) == next(labels)).sum()  # a tensor: read it once, at the end
    """
    if loss not in ("entropy", "marginal_entropy"):
        raise ValueError(f"loss must be 'entropy' or 'marginal_entropy', got {loss!r}")
    if loss == "marginal_entropy" and augment is None:
        raise ValueError("loss='marginal_entropy' averages over augmentations: pass augment=, a function batch -> batch")
    for inputs in batches:
        with torch.no_grad():
            predicted = model(inputs)
        yield predicted
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            value = entropy(model(inputs)) if loss == "entropy" else marginal_entropy(model, inputs, augment, copies)  # type: ignore[arg-type]
            value.backward()
        if not _finite(value, optimizer):  # a finite loss can still have non-finite gradients
            optimizer.zero_grad(set_to_none=True)
            continue
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _finite(loss: torch.Tensor, optimizer: Optimizer) -> bool:
    """Whether the loss and every gradient the optimizer would use are finite (one host read)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    checks = [torch.isfinite(loss).reshape(1)]
    checks += [torch.isfinite(norm).reshape(1).to(loss.device) for norm in torch._foreach_norm(grads)] if grads else []
    return bool(torch.cat(checks).all())  # sync-ok: once per batch, beside the predictions
