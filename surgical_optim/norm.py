"""Keep normalisation layers in eval mode through ``model.train()``.

The paper fine-tunes with BatchNorm in eval mode: the pre-trained running statistics normalise
the target data and are not updated by it. ``model.eval()`` does that, but it also switches
dropout off, and the next ``model.train()`` - which every training loop, PyTorch Lightning and
the Hugging Face Trainer call - switches both back. ``keep_norm_eval(model)`` pins only the
layers whose behaviour depends on the mode through running statistics (BatchNorm, SyncBatchNorm,
InstanceNorm with ``track_running_stats``) in eval mode; dropout and everything else keep following
``model.train()``/``model.eval()``. LayerNorm and GroupNorm compute the same thing in both modes,
so a transformer has nothing to pin.

Only the mode changes: the layers' affine weights train or stay frozen as ``select_blocks`` says.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["NormEvalHandle", "keep_norm_eval"]


class _TrainStaysEval:
    """Stands in for a layer's ``train`` method: whatever mode is asked, the layer stays in eval.

    An object rather than a closure, so that ``copy.deepcopy`` re-binds it to the copied layer and
    ``torch.save(model)`` can pickle it.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.layer, False)


class NormEvalHandle:
    """The layers ``keep_norm_eval`` pinned in eval mode; ``remove()`` lets them follow the model
    again. Also a context manager: pinned inside the ``with`` block, released on leaving it."""

    def __init__(self, model: nn.Module, layers: tuple[nn.Module, ...]) -> None:
        self.model = model
        self.layers = layers

    def remove(self) -> None:
        """Let the layers follow ``model.train()``/``model.eval()`` again, from the model's mode now."""
        for layer in self.layers:
            if isinstance(layer.__dict__.get("train"), _TrainStaysEval):
                del layer.__dict__["train"]
            layer.train(self.model.training)

    def __enter__(self) -> NormEvalHandle:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"NormEvalHandle({len(self.layers)} normalisation layers kept in eval mode)"


def keep_norm_eval(model: nn.Module) -> NormEvalHandle:
    """Put the model's normalisation layers with running statistics in eval mode and keep them
    there, even after ``model.train()``. Dropout is untouched. Returns a handle whose ``remove()``
    undoes it.

    Example::

        >>> model = torchvision.models.resnet50(weights="DEFAULT")
        >>> keep_norm_eval(model)   # BatchNorm uses and keeps its pre-trained statistics
        >>> model.train()           # dropout on; every BatchNorm still in eval mode
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"keep_norm_eval(model) takes the torch.nn.Module itself, got {type(model).__name__}"
        )
    pinned = []
    for layer in model.modules():
        if not isinstance(layer, _NormBase) or isinstance(layer.__dict__.get("train"), _TrainStaysEval):
            continue
        layer.train = _TrainStaysEval(layer)  # type: ignore[method-assign]  # an instance attribute
        layer.train(False)
        pinned.append(layer)
    return NormEvalHandle(model, tuple(pinned))
