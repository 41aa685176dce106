"""A `torch.optim.Optimizer` that wraps another optimizer.

The pitfalls this base class exists to avoid:

* it *is* an ``Optimizer`` (schedulers, Lightning and Accelerate check ``isinstance``);
* ``param_groups``, ``state`` and ``defaults`` are properties that read the inner optimizer, so
  ``load_state_dict`` (which replaces the inner ``param_groups`` list) never leaves a stale copy and
  schedulers drive the inner learning rate;
* the hook dictionaries are initialised and ``step`` is patched exactly as ``Optimizer.__init__`` does,
  so ``register_step_pre_hook``/``post_hook`` and the state-dict hooks fire;
* no attribute is forwarded blindly: in particular ``_step_supports_amp_scaling`` of a fused inner
  optimizer is *not* inherited, so ``GradScaler`` unscales gradients before our ``step`` sees them;
* the wrapper's own state travels in the same ``state_dict`` under one extra key, and is restored by
  the wrapper itself (``Optimizer.load_state_dict`` would cast it to the parameters' dtype);
* ``torch.distributed.checkpoint`` (DCP, the usual FSDP2 path) is served too; see ``state_dict``.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.optim import Optimizer

from ._foreach import DTensor, local_tensor, statistics_dtype

__all__ = ["OptimizerWrapper"]


# state key -> wrapper class name, for naming what a checkpoint holds
_KINDS: dict[str, str] = {}


class OptimizerWrapper(Optimizer):
    """Base class: owns an inner optimizer and exposes its parameter groups and state."""

    #: key under which a subclass stores its own state in ``state_dict()``
    _state_key: str = "surgical_optim"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_state_key" in cls.__dict__:
            _KINDS[cls._state_key] = cls.__name__
        if "step" in cls.__dict__:
            cls.step = _inner_only_when_dcp_initialises(cls.__dict__["step"])  # type: ignore[method-assign]

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{type(self).__name__} wraps a torch.optim.Optimizer instance, got "
                f"{type(optimizer).__name__}. Build the optimizer first, e.g. "
                f"{type(self).__name__}(torch.optim.AdamW(model.parameters(), lr=1e-3))."
            )
        self._refuse_nesting_twice(optimizer)
        if any("params" in g and len(g["params"]) == 0 for g in optimizer.param_groups):
            raise ValueError("the wrapped optimizer has an empty parameter group")
        # Internally always `self._inner`, never `self.optimizer`: Lightning's LightningOptimizer
        # proxy subclasses our class and defines its own `optimizer` property (= the wrapper itself),
        # forwarding unknown attributes such as `_inner` to us.
        self._inner = optimizer
        # What Optimizer.__init__ sets up besides param groups (we must not re-add the groups).
        self._optimizer_step_pre_hooks = OrderedDict()  # type: ignore[assignment]
        self._optimizer_step_post_hooks = OrderedDict()  # type: ignore[assignment]
        self._optimizer_state_dict_pre_hooks = OrderedDict()  # type: ignore[assignment]
        self._optimizer_state_dict_post_hooks = OrderedDict()  # type: ignore[assignment]
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()  # type: ignore[assignment]
        self._optimizer_load_state_dict_post_hooks = OrderedDict()  # type: ignore[assignment]
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    # ------------------------------------------------------------------ views of the inner optimizer
    @property
    def optimizer(self) -> Optimizer:
        """The wrapped (inner) optimizer."""
        return self._inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self._inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._inner.defaults = value

    def params(self) -> list[torch.Tensor]:
        """All parameters in ``param_groups`` order (the order of ``multipliers()``/``mask()``)."""
        return [p for group in self.param_groups for p in group["params"]]

    def _named_groups(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for index, group in enumerate(self.param_groups):
            yield str(group.get("name", f"group{index}")), group

    # ------------------------------------------------------------------ forwarding
    def zero_grad(self, set_to_none: bool = True) -> None:
        self._inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._inner.add_param_group(param_group)
        self._on_layout_change()

    def _on_layout_change(self) -> None:
        """Parameters were added or a state dict was loaded: re-read the layout, reset statistics."""
        params = self.params()
        if not params:
            raise ValueError("the wrapped optimizer has no parameters")
        self._params_cache = params
        self._device = params[0].device
        # float64 statistics when any parameter is float64 (so double-precision runs stay exact)
        self._dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        self._reset_statistics(len(params))

    def _reset_statistics(self, n: int) -> None:
        """Subclasses allocate their per-parameter statistics for ``n`` parameters."""

    def _current_params(self) -> list[torch.Tensor]:
        """The parameters for this step; re-reads the layout if someone changed ``param_groups``."""
        params = self.params()
        cached = self._params_cache
        if len(params) != len(cached) or any(a is not b for a, b in zip(params, cached)):
            self._on_layout_change()
        return params

    def _inner_step(self, inner_closure: Callable[[], Any] | None) -> Any:
        return self._inner.step(inner_closure) if inner_closure is not None else self._inner.step()

    def _refuse_nesting_twice(self, optimizer: Optimizer) -> None:
        layers = _chain(optimizer)
        if any(getattr(layer, "_state_key", None) == self._state_key for layer in layers):
            name = type(self).__name__
            kept = [type(layer).__name__ for layer in layers if getattr(layer, "_state_key", None) != self._state_key]
            raise ValueError(
                f"{name}({_describe(optimizer)}) would apply {name} twice (and both would share one "
                f"checkpoint entry): wrap the inner optimizer once, e.g. "
                f"{'('.join([name, *kept])}(...){')' * len(kept)}"
            )

    def _wrapper_keys(self) -> set[str]:
        """The state keys of this wrapper and of the wrappers inside it."""
        return {layer._state_key for layer in _chain(self) if isinstance(layer, OptimizerWrapper)}

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self._inner).splitlines())
        return f"{type(self).__name__}(\n{inner}\n)"

    # pickling/deepcopy: Optimizer.__getstate__ keeps only defaults/state/param_groups, which for a
    # wrapper are properties; keep the whole instance dict instead.
    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    # ------------------------------------------------------------------ closure protocol
    def _evaluate_closure(
        self, closure: Callable[[], Any] | None
    ) -> tuple[Any, Callable[[], Any] | None]:
        """Run ``closure`` once (forward and backward) so that statistics see fresh gradients.

        Returns the loss and a closure for the inner optimizer that returns this loss on its first
        call and re-evaluates afterwards (LBFGS-style optimizers call it repeatedly).
        """
        if closure is None:
            return None, None
        with torch.enable_grad():
            loss = closure()
        first_call = [True]

        def inner_closure() -> Any:
            if first_call[0]:
                first_call[0] = False
                return loss
            with torch.enable_grad():
                return closure()

        return loss, inner_closure

    # ------------------------------------------------------------------ checkpointing
    def _wrapper_state(self) -> dict[str, Any]:
        """This wrapper's state. Conventions the base class relies on: a 1-d tensor or a list holds
        one entry per parameter (``param_groups`` order), and tensors inside such a list are shaped
        like their parameter (its local shard under FSDP2)."""
        return {}

    def _load_wrapper_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict plus this wrapper's state under one extra key.

        For DCP's ``get_optimizer_state_dict``, which keeps only ``state`` and ``param_groups``, the
        key goes into the first param group instead, in a form DCP can save and load: see
        ``_portable_state``.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = dict(self._inner.state_dict())
        dcp_caller = _dcp_frame("_get_optim_state_dict")
        if dcp_caller is None:
            state_dict[self._state_key] = self._wrapper_state()
        else:
            self._refuse_flattening(dcp_caller)
            groups = [dict(group) for group in state_dict["param_groups"]]
            groups[0][self._state_key] = self._portable_state()
            state_dict["param_groups"] = groups
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a dict made by ``state_dict()``; a plain inner-optimizer dict is accepted too."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = dict(state_dict)
        self._refuse_state_of_other_wrappers(state_dict)
        wrapper_state = state_dict.pop(self._state_key, None)
        portable = _pop_from_groups(state_dict, self._state_key)
        if portable is not None:
            wrapper_state = self._from_portable(portable)
        if wrapper_state is not None:
            self._check_wrapper_state(wrapper_state)
        self._inner.load_state_dict(state_dict)
        self._on_layout_change()
        if wrapper_state is not None:
            self._load_wrapper_state(wrapper_state)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_wrapper_state(self, state: dict[str, Any]) -> None:
        """Refuse the state of another model before anything is loaded.

        Torch's optimizers compare the sizes of the param groups only (and load tensors of other
        shapes); the per-parameter entries of the wrapper's state also reveal other shapes.
        """
        params = self.params()
        kind = type(self).__name__
        for key, value in state.items():
            per_parameter = isinstance(value, list) or (isinstance(value, torch.Tensor) and value.dim() == 1)
            if per_parameter and len(value) != len(params):
                raise ValueError(
                    f"the checkpoint's {kind} state holds {len(value)} entries in {key!r}, one per "
                    f"parameter, but {_describe(self)} has {len(params)} parameters: it was saved for "
                    "another model or param-group layout; load it into an optimizer over the same parameters"
                )
            for i, (entry, p) in enumerate(zip(value if isinstance(value, list) else [], params)):
                if isinstance(entry, torch.Tensor) and entry.shape != local_tensor(p).shape:
                    raise ValueError(
                        f"the checkpoint's {kind} state {key!r} of parameter {i} has shape "
                        f"{tuple(entry.shape)} but the parameter has shape {tuple(local_tensor(p).shape)}: "
                        "it was saved for another model; load it into an optimizer over the same parameters"
                    )

    def _refuse_state_of_other_wrappers(self, state_dict: dict[str, Any]) -> None:
        # Without this check the inner optimizer would load the rest and the foreign state would be
        # dropped without a word. Missing state is fine: that wrapper starts fresh, as it does from a
        # plain inner-optimizer checkpoint.
        keys = _wrapper_keys_in(state_dict)
        foreign = sorted(_KINDS[key] for key in keys if key not in self._wrapper_keys())
        if foreign:
            raise ValueError(
                f"the checkpoint holds {' and '.join(foreign)} state, which {_describe(self)} does not "
                f"have: load it into the optimizer it was saved from, e.g. "
                f"{_describe_kinds(keys)}, or drop those entries to start them fresh"
            )

    # ------------------------------------------------------------------ torch.distributed.checkpoint
    # DCP keeps an optimizer state dict's "state" and "param_groups" only (with every key of a param
    # group), and dcp.load fills a state dict taken from a fresh optimizer, which must have the same
    # structure - tensor for tensor - as the saved one. Plain tensors are saved once (they must be the
    # same on every rank) and DTensors shard by shard.
    def _portable_state(self) -> dict[str, Any]:
        """``_wrapper_state()`` with a structure that does not change as training goes on.

        Lists of per-parameter buffers (tensor or None) become DTensors shaped like their parameter
        where it is one (the local buffers are FSDP2 shards) and zeros where a buffer is None, with
        the None-ness kept aside. Such zeros cost memory in checkpoints taken through DCP only.
        """
        params = self.params()
        portable: dict[str, Any] = {"state": {}, "buffers": {}, "present": {}}
        for key, value in self._wrapper_state().items():
            if _is_buffer_list(value) and len(value) == len(params):
                portable["present"][key] = [buffer is not None for buffer in value]
                portable["buffers"][key] = [_shardable(buffer, p) for buffer, p in zip(value, params)]
            else:
                portable["state"][key] = value
        return portable

    def _from_portable(self, portable: dict[str, Any]) -> dict[str, Any]:
        params = self.params()
        # .get: DCP's full_state_dict path flattens and rebuilds the dict, losing empty sub-dicts
        state = dict(portable.get("state", {}))
        for key, buffers in portable.get("buffers", {}).items():
            present = portable["present"][key]
            # no zip with params: a checkpoint of another model must reach _check_wrapper_state whole
            state[key] = [
                _local_buffer(buffer, params[i] if i < len(params) else None) if present[i] else None
                for i, buffer in enumerate(buffers)
            ]
        return state

    def _refuse_flattening(self, dcp_caller: Any) -> None:
        # the flattened form is rebuilt on load from the live optimizer's param-group keys, which do
        # not include ours: the state would be dropped when resuming, without a word
        options = dcp_caller.f_locals.get("info")
        if getattr(options, "flatten_optimizer_state_dict", False):
            raise ValueError(
                f"get_optimizer_state_dict(..., options=StateDictOptions(flatten_optimizer_state_dict=True)) "
                f"cannot carry {_describe(self)}'s own state (set_optimizer_state_dict would drop it): "
                "use flatten_optimizer_state_dict=False (the default)"
            )

    def _dcp_initialising(self) -> bool:
        """Whether this step is DCP's zero-gradient step that creates a fresh optimizer's state."""
        if torch.compiler.is_compiling() or self.state:
            return False
        return _dcp_frame("_init_optim_state") is not None


def _chain(optimizer: Optimizer) -> list[Optimizer]:
    """``optimizer`` and the optimizers inside it, outermost first."""
    layers = [optimizer]
    while isinstance(layers[-1], OptimizerWrapper):
        layers.append(layers[-1]._inner)
    return layers


def _describe(optimizer: Optimizer) -> str:
    """``AutoSNR(AutoRGN(AdamW))`` for a chain of wrappers."""
    names = [type(layer).__name__ for layer in _chain(optimizer)]
    return "(".join(names) + ")" * (len(names) - 1)


def _wrapper_keys_in(state_dict: dict[str, Any]) -> list[str]:
    """The wrapper state keys of a checkpoint: top-level (own format) or in param groups (DCP)."""
    keys = list(state_dict)
    for group in state_dict.get("param_groups", []):
        keys.extend(group)
    return list(dict.fromkeys(key for key in keys if key in _KINDS))


def _describe_kinds(keys: list[str]) -> str:
    """The wrappers whose state a checkpoint holds, as a construction, e.g. ``AutoSNR(AutoRGN(...))``."""
    # each wrapper adds its entry after its inner optimizer's, so the outermost comes last
    names = [_KINDS[key] for key in reversed(keys)]
    return "(".join(names + ["..."]) + ")" * len(names)


def _pop_from_groups(state_dict: dict[str, Any], key: str) -> Any:
    """Remove ``key`` from every param group (DCP may move it to another); return its value."""
    found = None
    groups = []
    for group in state_dict.get("param_groups", []):
        if key in group:
            group = dict(group)
            value = group.pop(key)
            found = value if found is None else found
        groups.append(group)
    if "param_groups" in state_dict:
        state_dict["param_groups"] = groups
    return found


def _is_buffer_list(value: Any) -> bool:
    return isinstance(value, list) and all(v is None or isinstance(v, torch.Tensor) for v in value)


def _shardable(buffer: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    local = local_tensor(p)
    if buffer is None:  # zeros in the dtype the wrappers' statistics take
        buffer = torch.zeros(local.shape, dtype=statistics_dtype(p.dtype), device=local.device)
    if local is p:
        return buffer
    return DTensor.from_local(buffer, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _local_buffer(buffer: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    if DTensor is None or not isinstance(buffer, DTensor):
        return buffer
    if p is not None and isinstance(p, DTensor):  # a no-op when DCP loaded into our own placeholder
        return buffer.redistribute(p.device_mesh, p.placements).to_local()
    return buffer.full_tensor()


def _dcp_frame(function_name: str) -> Any:
    """The frame of ``torch.distributed.checkpoint.state_dict.<function_name>`` if it is a caller.

    DCP gives optimizers no hook of their own: it calls ``optim.state_dict()`` and ``optim.step()``
    from these functions. If DCP was never imported, it is not calling.
    """
    function = getattr(sys.modules.get("torch.distributed.checkpoint.state_dict"), function_name, None)
    if function is None:
        return None
    code = inspect.unwrap(function).__code__
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame


def _inner_only_when_dcp_initialises(step: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a subclass's ``step``: DCP creates a fresh optimizer's state with a step on zero gradients
    at learning rate 0. For the wrappers that would be a step of their statistics (a sample of zero
    gradients, an RGN of 0 in the window, a step count); it initialises the innermost optimizer only,
    exactly as DCP does for a bare one."""

    @functools.wraps(step)
    def guarded(self: OptimizerWrapper, *args: Any, **kwargs: Any) -> Any:
        if self._dcp_initialising():
            return _chain(self)[-1].step()
        return step(self, *args, **kwargs)

    return guarded
