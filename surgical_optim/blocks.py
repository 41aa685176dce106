"""Split a model's parameters into ordered blocks for surgical fine-tuning.

Surgical fine-tuning (Lee et al., ICLR 2023) trains one block of a pretrained network and freezes
the rest; which block works best depends on the kind of distribution shift (input-level shifts
favour the first block, output-level shifts the last). This module answers "what are the blocks
of this model, input side first?" and turns the answer into torch param groups.

Every parameter (as listed by ``model.named_parameters()``, which lists a shared or tied parameter
once, under its first name) lands in exactly one block. Blocks are found by the first rule that
applies:

1. A user ``matcher``: a dict of regexes in timm's ``group_matcher`` protocol, or a callable
   ``parameter name -> block name``.
2. The model's own ``group_matcher(coarse=True)`` (every timm model has one). The grouping equals
   timm's coarse grouping; groups are named after the dict key plus the captured index
   (``stem``, ``blocks.0`` ... ``blocks.11``), the group of unmatched parameters after the module
   path its parameters share (``fc``, ``head``), or ``head`` when they share none.
3. Architectures recognised by structure (attribute names and types, not class names):

   * torchvision ResNet / Wide-ResNet / ResNeXt (and CIFAR ResNets with ``conv1``, ``bn1``,
     ``layer1``...): ``stem`` (conv1 + bn1), ``layer1`` ... ``layer4``, ``fc``.
   * RobustBench-style Wide-ResNet (``conv1``, ``block1``..``block3``, ``bn1``, ``fc``): the paper's
     CIFAR blocks ``block1`` (with conv1), ``block2``, ``block3`` (with the final bn1), ``fc``.
   * torchvision VisionTransformer: ``embed`` (conv_proj, class_token, pos_embedding), ``layer0``
     ... ``layerN-1`` (the final ``encoder.ln`` joins the last layer), ``heads``.
   * Hugging Face transformers (an ``embeddings`` or ``embed_tokens`` module and an
     ``encoder.layer``, ``transformer.layer`` or ``layers`` ModuleList, on the model or on a direct
     child such as ``bert``): ``embeddings``, ``layer0`` ... ``layerN-1``, ``pooler``, then the task
     head (``classifier``); any other child keeps its own name and place (``norm``, ``lm_head``).
   * torchvision CNNs with a ``features`` or ``trunk_output`` nn.Sequential (ConvNeXt,
     EfficientNet, MobileNetV2/V3, Swin, RegNet, VGG, DenseNet...): one block per element
     (``features.0`` ... / ``trunk_output.block1`` ...); every other top-level child is one block
     (``stem``, ``norm``, ``classifier``, ``head``, ``fc``).

4. Fallback: the model's children in order, each a block named after its attribute (``stem``,
   ``norm``, ``head``; never merged, since these names are how users select blocks); a parameter
   registered directly on the model is a block named after the parameter. A child that is an
   nn.Sequential / ModuleList / ModuleDict is split by what it holds, telling *layers* (modules
   holding their parameters themselves: conv, norm, linear, embedding) from *composite* modules
   (holding parameters in submodules: residual blocks, transformer layers, nested Sequentials):

   * a container of layers is one block: ``stem = nn.Sequential(conv, bn, relu)`` is ``stem``;
   * a container with a composite element is split, one block per composite element
     (``stages.0``, ``stages.1``...) and one per run of consecutive layers, named after its first
     and last layer (``body.0-1`` for a conv + bn in front of residual blocks; a lone layer keeps
     its own name, ``body.5``);
   * parameterless elements (activations, pooling, dropout) form no block, are neither layers nor
     composite, and do not interrupt a run of layers.

   A model that is itself a container is split the same way at the top level (``0-1``, ``3``,
   ``4``...), its container elements in turn as above; made of layers only, it is one block per
   layer (``0``, ``2``... for an MLP).

Rules 2 to 4 look through wrappers whose parameters all sit in a single child and that have no
parameters of their own (DistributedDataParallel's ``module``, ``torch.compile``'s ``_orig_mod``, a
LightningModule holding ``self.model``...). A user matcher always sees the full names of
``model.named_parameters()``.

The paper's first block and last layer
--------------------------------------
The paper tunes "the first block" of a ResNet as conv1 + bn1 + the first stage, and of a
RobustBench Wide-ResNet as conv1 + block1: the input stem together with the first stage. The
blocks above keep the stem apart (so that it can be tuned alone), and ``select_blocks(model,
"first")`` selects the stem *and* the block after it, whatever the architecture:

* the stem is ``stem`` (ResNet, timm models, RegNet), ``embed`` (torchvision ViT), ``embeddings``
  or ``embed_tokens`` (Hugging Face), the trunk's leading conv + norm units and layers in front of
  its first stage (``features.0`` of ConvNeXt, EfficientNet, MobileNet, Swin; DenseNet's
  ``features.conv0``, ``features.norm0``), or, by the fallback rule, the blocks in front of the
  first split composite element (``stem`` in front of ``stages.0``);
* a RobustBench WRN (conv1 already in ``block1``), a plain stack of layers (VGG, an MLP), a
  callable matcher and a timm model whose matcher is a function (CaiT) have no separate stem:
  "first" is their first block.

``"last"`` is the last block, the output head (``fc``, ``head``, ``heads``, ``classifier``).

Example::

    >>> import torch, torchvision
    >>> model = torchvision.models.resnet18(weights=None)
    >>> block_names(model)
    ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']
    >>> groups = select_blocks(model, "first")      # conv1 + bn1 + layer1, the paper's first block
    >>> [g["name"] for g in groups]
    ['stem', 'layer1']
    >>> optimizer = torch.optim.Adam(groups, lr=1e-3)
"""

from __future__ import annotations

import collections.abc
import difflib
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, SupportsInt, Union

from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "BlockMatcher",
    "BlockRow",
    "BlockSelector",
    "TrainableReport",
    "UnknownBlockError",
    "block_names",
    "param_groups_by_block",
    "select_blocks",
    "trainable_report",
]

# One regex specification of timm's group_matcher protocol: a regex, or a list of
# (regex, ordinal suffix) pairs where the suffix is a tuple of numbers or None.
_RegexSpec = Union[
    str,
    re.Pattern[str],
    Sequence[tuple[Union[str, re.Pattern[str]], Optional[tuple[float, ...]]]],
    None,
]

BlockMatcher = Union[Mapping[str, _RegexSpec], Callable[[str], str]]
"""How to split a model into blocks.

Either a dict in timm's ``group_matcher`` protocol, e.g.
``{"stem": r"^conv1|^bn1", "blocks": [(r"^layer(\\d+)", None)]}`` (keys name the blocks in order;
regex capture groups give the numeric sub-order; an ordinal suffix of ``(99999,)`` merges into the
previous group; unmatched parameters form a last group), or a callable mapping a parameter name to
its block name, e.g. ``lambda name: name.split(".")[0]`` (blocks ordered by first appearance in
``model.named_parameters()``).
"""

# What select_blocks accepts: "first"/"last"/"all", a name, an index, a slice or range of
# indices, or a list/tuple of names and indices.
BlockSelector = Union[str, int, slice, range, Sequence[Union[str, int]]]

# timm's convention: a sort key ending in this ordinal joins the group before it.
_MATCH_PREV_GROUP = 99999.0

# The internal result of every rule: ordered (block name, indices into named_parameters()).
_Grouping = list[tuple[str, list[int]]]
_NamedParams = list[tuple[str, nn.Parameter]]


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def param_groups_by_block(
    model: nn.Module,
    matcher: BlockMatcher | None = None,
    *,
    trainable_only: bool = True,
) -> list[dict[str, Any]]:
    """The model's parameters as ordered torch param groups, one per block, input side first.

    Each group is ``{"params": [nn.Parameter, ...], "name": str}``, so the list can be handed to
    any ``torch.optim`` optimizer (the extra ``"name"`` key is kept in ``optimizer.param_groups``).
    With ``trainable_only`` (the default) only parameters with ``requires_grad`` are included and
    blocks left empty are dropped; a model with no trainable parameter raises ``ValueError``.

    Example::

        >>> model = torchvision.models.resnet18(weights=None)
        >>> groups = param_groups_by_block(model)
        >>> [g["name"] for g in groups]
        ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']
        >>> optimizer = torch.optim.Adam(groups, lr=1e-3)
    """
    groups = []
    for name, members in _named_blocks(model, matcher):
        params = [p for _, p in members if p.requires_grad or not trainable_only]
        if params:
            groups.append({"params": params, "name": name})
    if not groups:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (every requires_grad is False); "
            "unfreeze some with select_blocks(model, which), or pass trainable_only=False"
        )
    return groups


def block_names(model: nn.Module, matcher: BlockMatcher | None = None) -> list[str]:
    """The names of the model's blocks, input side first, over all parameters (frozen ones too).

    Example::

        >>> block_names(torchvision.models.resnet18(weights=None))
        ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']
    """
    return [name for name, _ in _named_blocks(model, matcher)]


def select_blocks(
    model: nn.Module,
    which: BlockSelector,
    matcher: BlockMatcher | None = None,
) -> list[dict[str, Any]]:
    """Unfreeze the chosen blocks, freeze every other parameter, and return the chosen groups.

    ``which`` is one of:

    * ``"first"``: the paper's first block, the input stem together with the block after it
      (``stem`` + ``layer1`` of a ResNet, ``stem`` + ``blocks.0`` of a timm ViT, ``embeddings`` +
      ``layer0`` of BERT; the first block where there is no separate stem, see the module
      docstring); ``"last"``: the last block, the output head; ``"all"`` (these keywords win over
      a block of the same name);
    * a block name, e.g. ``"layer2"``;
    * an int index into ``block_names(model)``, negative counting from the end;
    * a ``slice`` or ``range`` of indices, e.g. ``slice(0, 2)`` for the first two blocks;
    * a list or tuple mixing names and indices, e.g. ``["stem", -1]``.

    Blocks are computed over all parameters, frozen or not, so calls can be repeated with
    different selections. Returns the selected blocks' param groups (all their parameters, now
    trainable) in model order, ready for an optimizer.

    Raises :class:`UnknownBlockError` (a ``KeyError`` and a ``ValueError``) for an unknown name,
    listing the available ones;
    ``IndexError`` for an out-of-range index; ``ValueError`` for a selection of no block;
    ``TypeError`` for anything else.

    Example::

        >>> model = torchvision.models.resnet18(weights=None)
        >>> groups = select_blocks(model, "layer1")
        >>> optimizer = torch.optim.SGD(groups, lr=1e-2, momentum=0.9)
        >>> model.fc.weight.requires_grad
        False
    """
    blocks, stem = _split_model(model, matcher)
    chosen = _resolve_selection(which, [name for name, _ in blocks], stem)
    for index, (_, members) in enumerate(blocks):
        for _, param in members:
            param.requires_grad_(index in chosen)
    return [
        {"params": [p for _, p in blocks[i][1]], "name": blocks[i][0]} for i in sorted(chosen)
    ]


class BlockRow(NamedTuple):
    """One block of a :class:`TrainableReport`: its name and its (trainable) parameter counts."""

    name: str
    n_params: int
    n_trainable: int


@dataclass(frozen=True)
class TrainableReport:
    """How many parameters a model has and how many of them train, overall and per block.

    ``str(report)`` starts with a PEFT-style line
    ``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7331``
    followed by a per-block table.
    """

    total_params: int
    trainable_params: int
    blocks: tuple[BlockRow, ...]
    percent: float = field(init=False)

    def __post_init__(self) -> None:
        # Derived rather than passed in, so that it can never disagree with the counts.
        percent = 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0
        object.__setattr__(self, "percent", percent)

    def __str__(self) -> str:
        lines = [
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,}"
            f" || trainable%: {self.percent:.4f}"
        ]
        rows = [("block", "params", "trainable")]
        rows += [(row.name, f"{row.n_params:,}", f"{row.n_trainable:,}") for row in self.blocks]
        widths = [max(len(row[col]) for row in rows) for col in range(3)]
        for name, n_params, n_trainable in rows:
            lines.append(
                f"{name:<{widths[0]}}  {n_params:>{widths[1]}}  {n_trainable:>{widths[2]}}"
            )
        return "\n".join(lines)


def trainable_report(model: nn.Module, matcher: BlockMatcher | None = None) -> TrainableReport:
    """Count all and trainable parameters, overall and per block (shared parameters once).

    Example::

        >>> model = torchvision.models.resnet18(weights=None)
        >>> _ = select_blocks(model, "fc")
        >>> print(trainable_report(model))
        trainable params: 513,000 || all params: 11,689,512 || trainable%: 4.3885
        block      params  trainable
        stem        9,536          0
        layer1    147,968          0
        layer2    525,568          0
        layer3  2,099,712          0
        layer4  8,393,728          0
        fc        513,000    513,000
    """
    rows = []
    for name, members in _named_blocks(model, matcher):
        n_params = n_trainable = 0
        for param_name, param in members:
            if isinstance(param, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"parameter {param_name!r} is uninitialised (a lazy module); run one forward "
                    "pass before counting parameters"
                )
            n_params += param.numel()
            n_trainable += param.numel() if param.requires_grad else 0
        rows.append(BlockRow(name, n_params, n_trainable))
    return TrainableReport(
        total_params=sum(row.n_params for row in rows),
        trainable_params=sum(row.n_trainable for row in rows),
        blocks=tuple(rows),
    )


# --------------------------------------------------------------------------------------------------
# Dispatch: which rule splits this model
# --------------------------------------------------------------------------------------------------


class _Split(NamedTuple):
    """A model's blocks in order, and how many leading blocks form its input stem."""

    blocks: list[tuple[str, _NamedParams]]
    stem: int  # 0 when no stem is recognised, or when nothing but the stem would follow


def _split_model(model: nn.Module, matcher: BlockMatcher | None) -> _Split:
    """Ordered (block name, [(parameter name, parameter), ...]) over all parameters, and the stem."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model itself "
            "(e.g. param_groups_by_block(model)), not model.parameters() or a state_dict"
        )
    named = list(model.named_parameters())
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters, so it has no blocks")
    names = [name for name, _ in named]

    stem_names: frozenset[str] = frozenset()
    if matcher is None:
        grouping, stem_names = _auto_grouping(model, names)
    elif isinstance(matcher, Mapping):
        grouping, stem_names = _group_by_regex(names, matcher), _TIMM_STEM
    elif callable(matcher) and not isinstance(matcher, nn.Module):
        grouping = _group_by_block_fn(names, _checked_block_fn(matcher), order=())
    else:
        raise TypeError(
            "matcher must be a dict of regexes in timm's group_matcher protocol or a callable "
            f"mapping a parameter name to a block name (str), got {type(matcher).__name__}"
        )
    blocks = [(block, [named[i] for i in sorted(indices)]) for block, indices in grouping]
    return _Split(blocks, _stem_length([block for block, _ in blocks], stem_names))


def _named_blocks(model: nn.Module, matcher: BlockMatcher | None) -> list[tuple[str, _NamedParams]]:
    return _split_model(model, matcher).blocks


# timm's group_matcher names the input stem "stem" (patch embedding, first conv): a dict matcher
# in its protocol follows the same convention.
_TIMM_STEM = frozenset({"stem"})


def _stem_length(names: list[str], stem_names: frozenset[str]) -> int:
    """How many leading blocks are stem blocks; 0 unless a block follows them."""
    length = 0
    while length < len(names) and names[length] in stem_names:
        length += 1
    return length if length < len(names) else 0


def _checked_block_fn(matcher: Callable[[str], Any]) -> Callable[[str], str]:
    """Wrap a user callable so that a non-str answer is a clear TypeError."""

    def block_of(name: str) -> str:
        block = matcher(name)
        if not isinstance(block, str):
            raise TypeError(
                f"matcher returned {block!r} ({type(block).__name__}) for parameter {name!r}; "
                "a callable matcher must return the block name as a str"
            )
        return block

    return block_of


def _auto_grouping(model: nn.Module, names: list[str]) -> tuple[_Grouping, frozenset[str]]:
    """Rules 2-4 of the module docstring, looking through single-child wrappers; and the names of
    the blocks that form the input stem."""
    prefix = ""
    module = model
    while True:
        local = [name[len(prefix) :] for name in names]
        found = _recognise(module, local)
        if found is not None:
            return found
        child = _sole_parameter_child(module)
        if child is None:
            break
        child_name, module = child
        prefix += child_name + "."
    grouping, stem = _fallback_grouping(module, local)
    named = [(prefix + block, indices) for block, indices in grouping]
    return named, frozenset(prefix + block for block in stem)


def _recognise(module: nn.Module, names: list[str]) -> tuple[_Grouping, frozenset[str]] | None:
    """The model's own group_matcher, else a recognised architecture, else None."""
    # Looked up on the class: a wrapper forwarding attributes must not lend its model's matcher.
    if callable(getattr(type(module), "group_matcher", None)):
        spec = type(module).group_matcher(module, coarse=True)  # type: ignore[attr-defined]
        if isinstance(spec, Mapping):
            return _group_by_regex(names, spec), _TIMM_STEM
        if callable(spec):  # a few timm models (CaiT, Inception) return name -> ordinal
            return _group_by_ordinal(names, spec), frozenset()
    for rule in _ARCHITECTURE_RULES:
        found = rule(module)
        if found is not None:
            block_of, order, stem = found
            return _group_by_block_fn(names, block_of, order), stem
    return None


def _sole_parameter_child(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The one child holding all of a wrapper's parameters, if the module is such a wrapper."""
    if any(True for _ in module.parameters(recurse=False)):
        return None
    holders = [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]
    return holders[0] if len(holders) == 1 else None


# --------------------------------------------------------------------------------------------------
# Groupers: parameter names -> ordered (block name, indices)
# --------------------------------------------------------------------------------------------------


def _group_by_block_fn(
    names: list[str], block_of: Callable[[str], str], order: Sequence[str]
) -> _Grouping:
    """Group by ``block_of(name)``; blocks listed in ``order`` come in that order.

    A block not in ``order`` is placed right after the listed block whose parameter precedes its
    first parameter in ``named_parameters()`` (or first, if none does); with an empty ``order``
    this is plain first-appearance order.
    """
    rank = {block: r for r, block in enumerate(order)}
    members: dict[str, list[int]] = {}
    sort_key: dict[str, tuple[int, int, int]] = {}
    anchor = -1
    for index, name in enumerate(names):
        block = block_of(name)
        if block in rank:
            anchor = rank[block]
        if block not in members:
            members[block] = []
            sort_key[block] = (rank[block], 0, 0) if block in rank else (anchor, 1, len(sort_key))
        members[block].append(index)
    return [(block, members[block]) for block in sorted(members, key=sort_key.__getitem__)]


def _group_by_regex(names: list[str], spec: Mapping[Any, Any]) -> _Grouping:
    """timm's ``group_with_matcher`` semantics for a dict matcher, with readable group names.

    Each parameter gets the sort key ``(key ordinal, *captured numbers, *suffix)`` of the first
    regex that matches the start of its name, or ``(inf,)`` when none does; groups are the sorted
    distinct keys, except that a key ending in 99999 joins the group before it.
    """
    rules = _compile_regex_matcher(spec)
    by_key: dict[tuple[float, ...], list[int]] = {}
    label: dict[tuple[float, ...], str | None] = {}
    for index, name in enumerate(names):
        key, name_label = _regex_sort_key(name, rules)
        by_key.setdefault(key, []).append(index)
        label.setdefault(key, name_label)
    return _merge_sorted_keys(by_key, label, names, unnamed=lambda position: "head")


def _group_by_ordinal(names: list[str], matcher: Callable[[str], Any]) -> _Grouping:
    """timm's semantics for a callable matcher returning an ordinal or a tuple of ordinals."""
    by_key: dict[tuple[float, ...], list[int]] = {}
    for index, name in enumerate(names):
        ordinal = matcher(name)
        if isinstance(ordinal, collections.abc.Iterable):
            key = tuple(float(x) for x in ordinal)
        else:
            key = (float(ordinal),)
        by_key.setdefault(key, []).append(index)
    label: dict[tuple[float, ...], str | None] = {key: None for key in by_key}
    return _merge_sorted_keys(
        by_key, label, names, unnamed=lambda position: f"group{position}"
    )


def _merge_sorted_keys(
    by_key: dict[tuple[float, ...], list[int]],
    label: dict[tuple[float, ...], str | None],
    names: list[str],
    unnamed: Callable[[int], str],
) -> _Grouping:
    """Sorted keys become groups; a key ending in the MATCH_PREV_GROUP ordinal joins the last."""
    groups: list[tuple[str | None, list[int]]] = []
    for key in sorted(by_key):
        if groups and key[-1] == _MATCH_PREV_GROUP:
            groups[-1][1].extend(by_key[key])
        else:
            groups.append((label[key], list(by_key[key])))
    named: list[str] = []
    for position, (group_label, indices) in enumerate(groups):
        if group_label is None:
            # No regex named it (unmatched, or a callable's ordinal): use the module path the
            # group's parameters share, e.g. "fc" for a ResNet's unmatched classifier.
            group_label = _common_module_path([names[i] for i in indices]) or unnamed(position)
        named.append(group_label)
    return list(zip(_make_unique(named), (indices for _, indices in groups)))


def _compile_regex_matcher(
    spec: Mapping[Any, Any],
) -> list[tuple[re.Pattern[str], str, int, tuple[float, ...]]]:
    """(regex, block label, key ordinal, ordinal suffix) for each regex, in matching order."""
    rules: list[tuple[re.Pattern[str], str, int, tuple[float, ...]]] = []
    # The ordinal is the key's position, counting keys whose spec is None (timm does the same).
    for ordinal, (key, regex_spec) in enumerate(spec.items()):
        if regex_spec is None:
            continue
        if isinstance(regex_spec, (str, re.Pattern)):
            rules.append((re.compile(regex_spec), str(key), ordinal, ()))
            continue
        if not isinstance(regex_spec, (list, tuple)):
            raise TypeError(
                f"matcher[{key!r}] must be a regex string or a list of (regex, ordinal tuple or "
                f"None) pairs, got {type(regex_spec).__name__}"
            )
        for entry in regex_spec:
            if not (
                isinstance(entry, (list, tuple))
                and len(entry) == 2
                and isinstance(entry[0], (str, re.Pattern))
            ):
                raise TypeError(
                    f"matcher[{key!r}] entries must be (regex, ordinal tuple or None) pairs, "
                    f"got {entry!r}"
                )
            regex, suffix = entry
            if suffix is None:
                suffix = ()
            elif not (
                isinstance(suffix, (list, tuple))
                and all(isinstance(x, numbers.Real) for x in suffix)
            ):
                raise TypeError(
                    f"matcher[{key!r}]: the ordinal of {regex!r} must be a tuple of numbers, "
                    f"such as (0,) or (99999,), or None; got {suffix!r}"
                )
            rules.append((re.compile(regex), str(key), ordinal, tuple(float(x) for x in suffix)))
    return rules


def _regex_sort_key(
    name: str, rules: list[tuple[re.Pattern[str], str, int, tuple[float, ...]]]
) -> tuple[tuple[float, ...], str | None]:
    """timm's sort key of one parameter name, and the label of the block it names."""
    for pattern, key, ordinal, suffix in rules:
        match = pattern.match(name)
        if match is None:
            continue
        # Groups that did not take part in the match are None; timm would crash on them.
        captures = [group for group in match.groups() if group is not None]
        try:
            ordinals = tuple(float(group) for group in captures)
        except ValueError:
            raise ValueError(
                f"matcher regex {pattern.pattern!r} captured {captures} from {name!r}; capture "
                "groups must capture numbers, since they order the blocks"
            ) from None
        return (float(ordinal), *ordinals, *suffix), ".".join([key, *captures])
    return (math.inf,), None


def _common_module_path(names: list[str]) -> str:
    """The longest dotted module path shared by all the parameter names ("" if none)."""
    common = names[0].split(".")[:-1]
    for name in names[1:]:
        parts = name.split(".")[:-1]
        length = 0
        while length < min(len(common), len(parts)) and common[length] == parts[length]:
            length += 1
        common = common[:length]
    return ".".join(common)


def _make_unique(labels: list[str]) -> list[str]:
    """Suffix repeated labels with #2, #3... so that every block name selects one block."""
    seen: set[str] = set()
    unique = []
    for label in labels:
        candidate, count = label, 1
        while candidate in seen:
            count += 1
            candidate = f"{label}#{count}"
        seen.add(candidate)
        unique.append(candidate)
    return unique


def _fallback_grouping(module: nn.Module, names: list[str]) -> tuple[_Grouping, list[str]]:
    """Rule 4 of the module docstring: the top level in order, containers split by content.

    Also returns the stem: the blocks in front of the first stage, a stage being a composite
    element of a split container (a residual stage or block, a transformer layer); none when the
    split found no stage.
    """
    if isinstance(module, _CONTAINERS):
        # The model is itself a container: its elements are the top level. Made only of layers,
        # it has nothing coarser to offer than one block per layer.
        top = _container_blocks(module, "", merge_layers=_has_composite(module))
    else:
        # Attributes are the user's own names for the parts, so each stays a block of its own.
        top = [(key, [key], False) for key, child in module._modules.items() if child is not None]
    block_of_path: dict[str, str] = {}
    stages: set[str] = set()
    for label, keys, stage in top:
        child = module._modules[keys[0]]
        if len(keys) == 1 and isinstance(child, _CONTAINERS) and _has_composite(child):
            for sub_label, sub_keys, sub_stage in _container_blocks(child, label + ".", merge_layers=True):
                block_of_path.update((f"{label}.{key}", sub_label) for key in sub_keys)
                stages.update([sub_label] if sub_stage else [])
        else:
            block_of_path.update((key, label) for key in keys)
            stages.update([label] if stage else [])

    def block_of(name: str) -> str:
        parts = name.split(".")
        if len(parts) > 2 and f"{parts[0]}.{parts[1]}" in block_of_path:
            return block_of_path[f"{parts[0]}.{parts[1]}"]
        # A top-level child, or a parameter registered directly on the model or on a container.
        return block_of_path.get(parts[0], parts[0]) if len(parts) > 1 else parts[0]

    grouping = _group_by_block_fn(names, block_of, order=())
    blocks = [block for block, _ in grouping]
    first_stage = next((i for i, block in enumerate(blocks) if block in stages), 0)
    return grouping, blocks[:first_stage]


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _container_blocks(
    container: nn.Module, prefix: str, merge_layers: bool
) -> list[tuple[str, list[str], bool]]:
    """(block name, element keys, whether the block is a stage) of a container split into blocks.

    Each composite element is a block. With ``merge_layers``, consecutive layers form one block
    (a stem of conv + bn, a transition, a final norm + classifier), named after its first and last
    element (``body.0-1``); without, each layer is a block. Parameterless elements (activations,
    pooling, dropout) belong to no block and do not interrupt a run of layers. A stage is a
    composite element other than a plain container of layers (a conv + norm + activation unit).
    """
    runs: list[list[str]] = []
    in_run = False
    for key, child in container._modules.items():
        if child is None or not _has_parameters(child):
            continue
        layer = not _is_composite(child)
        if layer and in_run and merge_layers:
            runs[-1].append(key)
        else:
            runs.append([key])
        in_run = layer
    labels = [prefix + (keys[0] if len(keys) == 1 else f"{keys[0]}-{keys[-1]}") for keys in runs]
    is_stage = [len(keys) == 1 and _is_stage(container._modules[keys[0]]) for keys in runs]
    return list(zip(_make_unique(labels), runs, is_stage))


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_composite(module: nn.Module) -> bool:
    """Whether some parameters sit in a submodule: a residual block, a transformer layer...

    A layer (conv, norm, linear, embedding) holds its parameters itself; torch's parametrizations
    (weight_norm, spectral_norm...) move them into a ``parametrizations`` submodule, which still
    makes a layer, not a composite module.
    """
    skip = "parametrizations" if parametrize.is_parametrized(module) else None
    return any(
        child is not None and key != skip and _has_parameters(child)
        for key, child in module._modules.items()
    )


def _has_composite(container: nn.Module) -> bool:
    return any(child is not None and _is_composite(child) for child in container._modules.values())


def _is_stage(module: nn.Module) -> bool:
    """Whether a module is a unit of the network's body (a residual block or stage, a transformer
    layer) rather than part of a stem: composite, and not a plain container of layers such as
    torchvision's conv + norm + activation ``Conv2dNormActivation``."""
    if not _is_composite(module):
        return False
    return not isinstance(module, _CONTAINERS) or _has_composite(module)


# --------------------------------------------------------------------------------------------------
# Architectures recognised by structure. Each rule returns (parameter name -> block name, the known
# block names in input-to-output order, the names of the blocks that form the input stem) or None;
# parameter names are relative to the module.
# --------------------------------------------------------------------------------------------------

_Rule = Optional[tuple[Callable[[str], str], list[str], frozenset[str]]]


# Rules look at registered children and parameters only (``_modules``, ``_parameters``), never
# through ``getattr``: wrappers such as torch.compile's OptimizedModule forward unknown attributes
# to the wrapped model, which would make the wrapper look like the model while its parameter names
# carry the wrapper's prefix. (``named_children`` would not do: it hides a module registered twice.)
def _child(module: nn.Module | None, name: str) -> nn.Module | None:
    return None if module is None else module._modules.get(name)


def _has_modules(module: nn.Module | None, *names: str) -> bool:
    return all(_child(module, name) is not None for name in names)


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _resnet_rule(module: nn.Module) -> _Rule:
    """torchvision ResNet/Wide-ResNet/ResNeXt, and CIFAR ResNets built the same way."""
    if not _has_modules(module, "conv1", "bn1", "layer1"):
        return None
    layers = [n for n, _ in module.named_children() if re.fullmatch(r"layer\d+", n)]
    layers.sort(key=lambda n: int(n[len("layer") :]))

    def block_of(name: str) -> str:
        top = _top(name)
        return "stem" if top in ("conv1", "bn1") else top

    return block_of, ["stem", *layers, "fc"], frozenset({"stem"})


def _robustbench_wrn_rule(module: nn.Module) -> _Rule:
    """RobustBench/TRADES WideResNet: conv1, block1..block3, bn1 (final), fc.

    The paper's CIFAR blocks: conv1 joins block1 and the final bn1 joins block3. The unused
    ``sub_block1`` of some versions sits beside block1, so it joins block1 too.
    """
    if not _has_modules(module, "conv1", "block1", "block2", "block3", "bn1"):
        return None
    joins = {"conv1": "block1", "sub_block1": "block1", "bn1": "block3"}

    def block_of(name: str) -> str:
        top = _top(name)
        return joins.get(top, top)

    return block_of, ["block1", "block2", "block3", "fc"], frozenset()  # conv1 is in block1


def _torchvision_vit_rule(module: nn.Module) -> _Rule:
    """torchvision VisionTransformer: embed, one block per encoder layer, heads."""
    encoder = _child(module, "encoder")
    if not (
        _has_modules(module, "conv_proj")
        and module._parameters.get("class_token") is not None
        and _has_modules(encoder, "layers", "ln")
    ):
        return None
    layers = _child(encoder, "layers")
    assert layers is not None  # checked by _has_modules above
    layer_index = {n: i for i, (n, _) in enumerate(layers.named_children())}
    if not layer_index:
        return None
    layer_blocks = [f"layer{i}" for i in range(len(layer_index))]

    def block_of(name: str) -> str:
        parts = name.split(".")
        if parts[0] in ("class_token", "conv_proj") or name == "encoder.pos_embedding":
            return "embed"
        if parts[0] == "encoder" and len(parts) > 2:
            if parts[1] == "layers" and parts[2] in layer_index:
                return layer_blocks[layer_index[parts[2]]]
            if parts[1] == "ln":  # the final norm acts on the last layer's output
                return layer_blocks[-1]
        return parts[0]

    return block_of, ["embed", *layer_blocks, "heads"], frozenset({"embed"})


def _hf_encoder_rule(module: nn.Module) -> _Rule:
    """Hugging Face transformers, bare or under a task model's backbone attribute (``bert``...)."""
    for path, backbone in [("", module), *module.named_children()]:
        # "embed_tokens": decoder-only language models (Llama, Mistral, Qwen, OPT...).
        if not (_has_modules(backbone, "embeddings") or _has_modules(backbone, "embed_tokens")):
            continue
        for stack in _HF_LAYER_STACKS:
            layers: nn.Module | None = backbone
            for part in stack:
                layers = _child(layers, part)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return _hf_block_fn(path, stack, layers)
    return None


# Where the layers sit: BERT/RoBERTa/ELECTRA..., DistilBERT, newer models (ViT in transformers 5).
_HF_LAYER_STACKS = (("encoder", "layer"), ("transformer", "layer"), ("layers",))


def _hf_block_fn(path: str, stack: tuple[str, ...], layers: nn.ModuleList) -> _Rule:
    layer_index = {n: i for i, (n, _) in enumerate(layers.named_children())}
    depth = len(stack)

    def block_of(name: str) -> str:
        parts = name.split(".")
        if path:
            if parts[0] != path:
                return parts[0]  # the task head: classifier, cls, qa_outputs...
            parts = parts[1:]
        if tuple(parts[:depth]) == stack and len(parts) > depth + 1:
            return f"layer{layer_index[parts[depth]]}"
        return parts[0]  # embeddings, pooler, a final norm: another child of the backbone

    order = ["embeddings", *(f"layer{i}" for i in range(len(layer_index))), "pooler"]
    return block_of, order, frozenset({"embeddings", "embed_tokens"})


def _trunk_cnn_rule(module: nn.Module) -> _Rule:
    """torchvision CNNs whose stages sit in one nn.Sequential: ``features`` or ``trunk_output``."""
    for trunk in ("features", "trunk_output"):
        if isinstance(_child(module, trunk), nn.Sequential):
            break
    else:
        return None

    def block_of(name: str) -> str:
        parts = name.split(".")
        if parts[0] == trunk and len(parts) > 2:
            return f"{trunk}.{parts[1]}"
        return parts[0]  # stem, norm, classifier, head, fc: each one block, never expanded

    return block_of, [], _trunk_stem(module, trunk)


def _trunk_stem(module: nn.Module, trunk: str) -> frozenset[str]:
    """The blocks in front of the trunk's first stage: a ``stem`` child (RegNet), the trunk's
    leading conv + norm units and layers (``features.0``; DenseNet's ``conv0``, ``norm0``)."""
    stem = []
    for key, child in module._modules.items():
        if child is None or not _has_parameters(child):
            continue
        if key != trunk:
            stem.append(key)
            continue
        for element_key, element in child._modules.items():
            if element is None or not _has_parameters(element):
                continue
            if _is_stage(element):
                return frozenset(stem)
            stem.append(f"{trunk}.{element_key}")
        break
    return frozenset()  # no stage: nothing to call a stem (VGG's plain stack of convs)


# Order matters only for models that would match two rules; the Hugging Face rule looks one level
# down for its backbone, so it goes first.
_ARCHITECTURE_RULES: tuple[Callable[[nn.Module], _Rule], ...] = (
    _hf_encoder_rule,
    _torchvision_vit_rule,
    _resnet_rule,
    _robustbench_wrn_rule,
    _trunk_cnn_rule,
)


# --------------------------------------------------------------------------------------------------
# select_blocks: resolving ``which``
# --------------------------------------------------------------------------------------------------


class UnknownBlockError(KeyError, ValueError):
    """``select_blocks`` was given a block name the model does not have.

    A ``KeyError`` (a missing key) and a ``ValueError`` (a bad argument), so either ``except`` catches
    it. ``name`` is the name asked for, ``available`` the model's block names, in order.
    """

    def __init__(self, name: str, available: Sequence[str]) -> None:
        self.name = name
        self.available = list(available)
        close = difflib.get_close_matches(name, self.available, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        super().__init__(
            f"unknown block {name!r}; {hint}the model's blocks are {', '.join(self.available)} "
            f"(print(trainable_report(model)) shows them with their sizes); or select with "
            f"{', '.join(repr(k) for k in _KEYWORDS)}, an index, a slice or a list"
        )

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.name, self.available)


_KEYWORDS = ("first", "last", "all")


def _resolve_selection(which: Any, names: list[str], stem: int) -> set[int]:
    """The block indices ``which`` selects (see select_blocks); ``stem`` leading blocks form the
    input stem, which "first" selects together with the block after it."""
    count = len(names)
    if isinstance(which, (str, numbers.Integral)) and not isinstance(which, bool):
        chosen = _resolve_item(which, names, stem)
    elif isinstance(which, slice):
        chosen = list(range(count))[which]
    elif isinstance(which, range):
        chosen = [_resolve_index(i, count) for i in which]
    elif isinstance(which, (list, tuple)):
        chosen = []
        for item in which:
            if not isinstance(item, (str, numbers.Integral)) or isinstance(item, bool):
                raise TypeError(
                    "a list or tuple of blocks may hold block names (str) and int indices, got "
                    f"{item!r} ({type(item).__name__})"
                )
            chosen += _resolve_item(item, names, stem)
    else:
        raise TypeError(
            "which must be 'first', 'last', 'all', a block name (str), an int index, a slice or "
            f"range of indices, or a list/tuple of names and indices; got {type(which).__name__}"
        )
    if not chosen:
        raise ValueError(
            f"{which!r} selects no block; the model has {count} blocks: {', '.join(names)}"
        )
    return set(chosen)


def _resolve_item(item: str | numbers.Integral, names: list[str], stem: int) -> list[int]:
    if not isinstance(item, str):
        return [_resolve_index(item, len(names))]
    if item == "first":
        return list(range(stem + 1))
    if item == "last":
        return [len(names) - 1]
    if item == "all":
        return list(range(len(names)))
    if item in names:
        return [names.index(item)]
    raise UnknownBlockError(item, names)


def _resolve_index(index: SupportsInt, count: int) -> int:
    position = int(index)
    if not -count <= position < count:
        raise IndexError(
            f"block index {position} is out of range: the model has {count} blocks "
            f"(valid indices {-count}..{count - 1})"
        )
    return position % count
