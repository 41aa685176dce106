"""The paper's unlabeled-stream experiment (online test-time adaptation), offline, on the source model.

Lee et al. (ICLR 2023) also adapt online, without labels, on a CIFAR-10-C stream with MEMO (the entropy
of the class distribution averaged over augmentations): no adaptation 67.8 %, all layers 69.7, the first
block 75.4, the first two 75.5, the last layer 67.8. Here the offline source model meets a stream of
``StreamConfig.stream`` images of one shift in batches of ``batch``; for each batch it predicts (the
prediction that is scored), then takes one Adam step on the unsupervised loss (``surgical_optim.
adapt_online``). The score is the *online accuracy*: the fraction of stream predictions, each made before
its batch's update, that are correct, plus its curve along the stream.

Variants (what adapts):

* ``none``: nothing; ``bn_stats``: nothing is tuned, but every BatchNorm normalises each stream batch
  with that batch's own mean and (biased) variance over (batch, height, width) instead of the source's
  running statistics, which are neither used nor updated, so nothing carries over from one batch to
  the next (test-time BN adaptation, Schneider et al. 2020; the affine weights stay the source's);
* ``all``, each block (``stem``, ``layer1`` .. ``layer4``, ``fc``), ``first`` (stem + layer1, the
  paper's "layer 1"), ``first_two`` (stem + layer1 + layer2, the paper's "layers 1-2"), all through
  ``surgical_optim.select_blocks`` + Adam; ``auto_rgn``: every parameter under ``AutoRGN(Adam)``.
  BatchNorm keeps the source's statistics (``keep_norm_eval``), as in the paper.

Losses: ``entropy`` (TENT's) and ``memo`` (``adapt_online(loss="marginal_entropy")`` over ``copies``
augmented copies, ``augment.py``).

Protocol: the learning rate of each (shift, seed, variant, loss) is chosen among ``lrs`` by the online
accuracy on a *held-out* stream (``held_out`` images of the same shift, drawn with another seed, labels
used: that is its validation role); the *scored* stream is then run once, at that lr, and its labels
only score. The order is :func:`stream_tasks` (held-out), :func:`choose_lr`, :func:`scored_tasks`
(scored); :func:`run_stream_experiment` runs it in one process. Every entry point is a function of
(model, shift, seed, variant, loss, lr, config) returning a JSON-serialisable dict; the seed also
indexes the source model (callers pass one model per seed). Deterministic at a fixed thread count.

Shifts (:data:`STREAM_SHIFTS`): the input-level shifts of ``shifts.SHIFTS`` (at their default severity
Gaussian and impulse noise leave the source at 26-32 %, where the paper's probe drifted to chance: they
stay, as the collapse rows), milder stream-only versions of the two noises at which the source is usable
(:data:`MILD_NOISE`), ``unseen_styles`` (feature-level) and the output-level ``label_permutation`` and
``spurious_flip``, where a label-free loss cannot find the new labelling.

Cost, and what it is designed around
------------------------------------
(Measured on 0.4's source model, whose stem ran at 32x32; with the stride-2 stem of 0.5 the 27 streams
take 428 CPU-s instead of 679, and the shares below moved towards the later blocks.)
A forward pass of the SmallResNet over a batch of 50 takes ~30 ms on one CPU thread, a forward +
backward ~82 ms in channels-last (~147 ms in NCHW, hence ``channels_last``); the stages cost stem
12 %, layer1 32 %, layer2 18 %, layer3 17 %, layer4 21 % of a forward. A variant that tunes the stem
pays predict + forward + backward of the whole network per batch: ~3 CPU-s per 2000 images with the
entropy loss, ~8.5 with MEMO at 4 copies (each copy is a forward + backward of its own).

What is shared (:class:`StreamCache`): BatchNorm is frozen, so the blocks in front of the first tuned
one are a fixed function; the stream's activations after them are computed once per (model, shift,
seed, stream) and reused by every variant and lr that starts later, and MEMO's augmented copies are
drawn once per stream (not per step) so that their prefix activations are shared too. Activations of
more than 8192 floats per image (the stem's output, 64 KB per image) are not stored: the stem is rerun
instead (12 % of a forward). ``fc`` and ``layer4`` become nearly free and ``layer2``/``layer3`` 40-60 %
cheaper; the five variants that tune the stem (stem, first, first_two, all, auto_rgn) still pay the
whole network, and they dominate.

So the default grid is cut where it costs least science: streams of 1000 images (20 steps) and
held-out streams of 500 (the brief's 2000/1000 keep the same ratio), MEMO with 2 copies and only on the
paper's rows (all, first, first_two, fc) and auto_rgn, the entropy loss on every tuned variant.
Measured on one thread of a shared two-core machine (contrast and mild Gaussian noise, seed 0, held-out
runs + scored runs): 43-44 CPU-s per (shift, seed), about half of it the held-out lr choice, and in
each half MEMO and entropy about equal shares; the 9 shifts x 3 seeds cost ~1200 CPU-s (~10 min on two
workers). :meth:`StreamConfig.full` (2000 / 1000 images, MEMO with 4 copies on every tuned variant)
costs 176 CPU-s per (shift, seed), ~4700 in all. Entropy alone on every tuned variant of a 2000-image
stream costs ~20 CPU-s per (shift, seed), 550 for the 27, before any lr choice: the 600 CPU-s target
is out of reach at that length.

A held-out stream half as long as the scored one judges an lr on half the steps, which favours the
smaller lr when the larger one pays off late or wobbles early (contrast, ``first`` + entropy: 1e-4
chosen on 500 held-out images, 1e-3 on 1000; 1e-3 reaches 87.5 % on the 2000-image stream).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from surgical_optim import AutoRGN, keep_norm_eval, select_blocks
from surgical_optim.online import adapt_online

from ..protocol.stages import frozen_prefix, split_stages
from . import data
from .augment import augmented_copies
from .pretrain import PretrainConfig
from .shifts import SHIFTS, Shift

__all__ = [
    "LOSSES",
    "MILD_NOISE",
    "PAPER_MEMO",
    "STREAM_SHIFTS",
    "VARIANTS",
    "OnlinePass",
    "StreamCache",
    "StreamConfig",
    "StreamTask",
    "choose_lr",
    "memo_copies",
    "online_pass",
    "run_stream",
    "run_stream_experiment",
    "run_task",
    "scored_tasks",
    "stream_images",
    "stream_seed",
    "stream_tasks",
]

#: rows of the table, in order; the first two adapt nothing (no loss, no lr)
VARIANTS: tuple[str, ...] = (
    "none", "bn_stats", "all", "stem", "layer1", "layer2", "layer3", "layer4", "fc", "first", "first_two", "auto_rgn",
)
UNTUNED: tuple[str, ...] = ("none", "bn_stats")
#: what ``select_blocks`` is given for each tuned variant (a block name stands for itself)
_SELECTION: dict[str, Any] = {
    "all": "all", "first": "first", "first_two": ["stem", "layer1", "layer2"], "auto_rgn": "all",
}
LOSSES: tuple[str, ...] = ("entropy", "memo")
_LIBRARY_LOSS = {"entropy": "entropy", "memo": "marginal_entropy"}

#: the paper's online MEMO accuracies on CIFAR-10-C (%), under our variant names
PAPER_MEMO: dict[str, float] = {"none": 67.8, "all": 69.7, "first": 75.4, "first_two": 75.5, "fc": 67.8}

#: stream-only milder noise: shift name -> (corruption, level): Gaussian sigma, or the fraction of pixel
#: values set to 0 or 1 (half each); unadapted, the source models are at 69 % on both (online accuracy
#: on the scored streams, mean over the three seeds)
MILD_NOISE: dict[str, tuple[str, float]] = {
    "gaussian_noise_mild": ("gaussian_noise", 0.15),
    "impulse_noise_mild": ("impulse_noise", 0.06),
}
_MILD_SHIFTS = (
    Shift("gaussian_noise_mild", "input", "additive Gaussian noise, sigma 0.15 (stream only)",
          corruption="gaussian_noise_mild"),
    Shift("impulse_noise_mild", "input", "salt-and-pepper noise on 6 % of the pixel values (stream only)",
          corruption="impulse_noise_mild"),
)
STREAM_SHIFTS: tuple[Shift, ...] = (
    tuple(s for s in SHIFTS if s.kind == "input") + _MILD_SHIFTS + tuple(s for s in SHIFTS if s.kind != "input")
)
#: the input-level shifts at which the source model is usable: the table's "input-level mean" column
USABLE_INPUT_SHIFTS: tuple[str, ...] = ("blur", "contrast", "gaussian_noise_mild", "impulse_noise_mild")

#: activations with more floats per image are recomputed rather than stored (see the module docstring)
_MAX_STORED_FLOATS = 8192


@dataclass(frozen=True)
class StreamConfig:
    """Sizes, grid and resolution of the stream experiment (defaults: the budget design of the module
    docstring; :meth:`full` is the larger grid). ``cue_agree``/``absent`` must be the source's (the runner
    passes ``PretrainConfig``'s, as ``target_splits`` does)."""

    stream: int = 1000
    batch: int = 50
    held_out: int = 500
    lrs: tuple[float, ...] = (1e-3, 1e-4)
    losses: tuple[str, ...] = LOSSES
    copies: int = 2
    variants: tuple[str, ...] = VARIANTS
    #: the tuned variants that also run with MEMO (every tuned variant runs with entropy): the paper's rows
    memo_variants: tuple[str, ...] = ("all", "first", "first_two", "fc", "auto_rgn")
    #: curve resolution: accuracy of each consecutive chunk of this many stream images
    chunk: int = 100
    cue_agree: float = PretrainConfig.cue_agree
    absent: float = PretrainConfig.absent
    channels_last: bool = True

    def __post_init__(self) -> None:
        for name in ("stream", "held_out"):
            size = getattr(self, name)
            if size % self.batch or size % data.NUM_CLASSES:
                raise ValueError(f"{name}={size} must be a multiple of batch={self.batch} and of {data.NUM_CLASSES}")
        if self.chunk % self.batch or self.stream % self.chunk or self.held_out % self.chunk:
            raise ValueError(f"chunk={self.chunk} must be a multiple of batch={self.batch} and divide stream={self.stream} "
                             f"and held_out={self.held_out}")
        unknown = set(self.variants + self.memo_variants) - set(VARIANTS) or set(self.losses) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown variants or losses {sorted(unknown)}; known: {VARIANTS}, {LOSSES}")
        if not self.lrs or self.copies < 1:
            raise ValueError("lrs needs at least one learning rate and copies at least 1")

    @classmethod
    def full(cls) -> StreamConfig:
        """The larger grid: 2000-image streams, a 1000-image held-out stream, MEMO with 4 copies on every
        tuned variant (about 6x the default's cost, see the module docstring)."""
        tuned = tuple(v for v in VARIANTS if v not in UNTUNED)
        return cls(stream=2000, held_out=1000, copies=4, memo_variants=tuned, chunk=200)

    def tuned_runs(self) -> list[tuple[str, str]]:
        """(variant, loss) of every tuned run, in table order."""
        return [(variant, loss) for variant in self.variants if variant not in UNTUNED for loss in self.losses
                if loss != "memo" or variant in self.memo_variants]

    def size(self, held_out: bool) -> int:
        return self.held_out if held_out else self.stream

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StreamTask:
    """One online pass: ``loss`` and ``lr`` are None for the untuned variants."""

    shift: Shift
    seed: int
    variant: str
    loss: str | None
    lr: float | None
    held_out: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"shift": self.shift.to_dict(), "seed": self.seed, "variant": self.variant, "loss": self.loss,
                "lr": self.lr, "held_out": self.held_out}


# ---------------------------------------------------------------------------------------- the stream
def stream_seed(seed: int, held_out: bool) -> int:
    """The generator seed of a stream; apart from the pre-training (1_000_003), target-split
    (7_000_000 + 1000 seed + ...) and calibration seeds, and the held-out stream's from the scored one's."""
    return 8_100_000 + 1000 * int(seed) + (500 if held_out else 0)


def stream_images(shift: Shift, seed: int, cfg: StreamConfig, *,
                  held_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream's images (N, 3, 32, 32) in stream order and their labels: class-balanced, shuffled,
    drawn and corrupted as ``target_splits`` draws a target split."""
    if shift.noise_block is not None:
        raise ValueError(f"{shift.name}: a block-noise shift changes the model, not the stream; "
                         "pass the perturbed model")
    generator_seed = stream_seed(seed, held_out)
    drawn = data.sample(cfg.size(held_out), generator_seed, styles=shift.styles, cue_agree=cfg.cue_agree,
                        cue_map=shift.cue_map, absent=cfg.absent)
    x, y = drawn["x"], drawn["y"]
    if shift.corruption is not None:
        x = _corrupt(x, shift.corruption, generator_seed)
    if shift.permute_labels:
        y = data.NUM_CLASSES - 1 - y
    return x, y


def memo_copies(shift: Shift, seed: int, cfg: StreamConfig, *, held_out: bool = False) -> torch.Tensor:
    """MEMO's augmented copies of the whole stream, (copies, N, 3, 32, 32): drawn once per stream from
    their own seed, so every variant and lr adapts on the same copies (``augment.py``)."""
    images, _ = stream_images(shift, seed, cfg, held_out=held_out)
    return augmented_copies(images, cfg.copies, _copies_seed(seed, held_out))


def _copies_seed(seed: int, held_out: bool) -> int:
    return stream_seed(seed, held_out) + 7


def _corrupt(x: torch.Tensor, corruption: str, seed: int) -> torch.Tensor:
    """``data.corrupt``; the milder noises of :data:`MILD_NOISE` are its noises at a lower level."""
    if corruption in MILD_NOISE:
        kind, level = MILD_NOISE[corruption]
        return data.corrupt(x, kind, seed, level=level)
    return data.corrupt(x, corruption, seed)


# ---------------------------------------------------------------------------- shared per-stream data
class StreamCache:
    """What passes over the same stream share: its images, MEMO's augmented copies and the activations
    after frozen prefixes, keyed by (model, shift, seed, held-out or scored, sizes). Holds a reference to
    every model it has seen, so a key's ``id(model)`` cannot be reused by another model while cached.
    Pass one cache per worker and clear it when moving to another stream (a default stream holds ~0.13 GB,
    one of :meth:`StreamConfig.full` ~0.4 GB). ``cpu_s``: the CPU seconds spent filling it."""

    def __init__(self) -> None:
        self._store: dict[tuple[Any, ...], Any] = {}
        self._models: dict[int, nn.Module] = {}
        self._making = 0  # nesting depth of make(): only the outermost is timed
        self.cpu_s = 0.0

    def get(self, model: nn.Module, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        full = (id(model), *key)
        if full not in self._store:
            started = time.process_time()
            self._making += 1
            try:
                self._store[full] = make()
            finally:
                self._making -= 1
            self._models[id(model)] = model
            if self._making == 0:
                self.cpu_s += time.process_time() - started
        return self._store[full]

    def clear(self) -> None:
        self._store.clear()
        self._models.clear()


def _stream_key(shift: Shift, seed: int, cfg: StreamConfig, held_out: bool) -> tuple[Any, ...]:
    return (shift, seed, held_out, cfg.size(held_out), cfg.batch, cfg.cue_agree, cfg.absent, cfg.channels_last)


def _layout(images: torch.Tensor, cfg: StreamConfig) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if cfg.channels_last else images.contiguous()


def _stages(model: nn.Module) -> list[nn.Module]:
    stages = split_stages(model)
    if stages is None:
        raise ValueError(f"{type(model).__name__} cannot be split into sequential stages, one per block")
    return [module for _, module in stages]


@torch.no_grad()
def _forward_batches(stages: Sequence[nn.Module], inputs: torch.Tensor, batch: int) -> torch.Tensor:
    """``inputs`` through ``stages``, ``batch`` rows at a time (the stream's batches, so a stored
    activation is what the same batch would compute inside the pass)."""
    outputs = []
    for rows in inputs.split(batch):
        for stage in stages:
            rows = stage(rows)
        outputs.append(rows)
    return torch.cat(outputs)


def _storable(numels: Sequence[int], boundary: int) -> bool:
    return boundary == 0 or numels[boundary] <= _MAX_STORED_FLOATS


def _boundary_activations(cache: StreamCache, model: nn.Module, key: tuple[Any, ...], images: torch.Tensor,
                          stages: Sequence[nn.Module], numels: Sequence[int], boundary: int,
                          batch: int) -> torch.Tensor:
    """``images`` after ``stages[:boundary]`` (a storable boundary), cached under ``key``, computed from the
    deepest storable boundary in front of it."""
    if boundary == 0:
        return images
    source = boundary - 1
    while not _storable(numels, source):
        source -= 1

    def make() -> torch.Tensor:
        earlier = _boundary_activations(cache, model, key, images, stages, numels, source, batch)
        return _forward_batches(stages[source:boundary], earlier, batch)

    return cache.get(model, (*key, "boundary", boundary), make)


# ------------------------------------------------------------------------------------ the variants
def _adapting_copy(model: nn.Module, variant: str, lr: float | None, cfg: StreamConfig) -> tuple[nn.Module, Any]:
    """A deep copy of ``model`` set up for ``variant``, and its optimizer (None when nothing is tuned)."""
    tuned = copy.deepcopy(model)
    if cfg.channels_last:
        tuned = tuned.to(memory_format=torch.channels_last)
    for parameter in tuned.parameters():
        parameter.requires_grad_(False)
    if variant == "bn_stats":
        _use_batch_statistics(tuned)
        return tuned.eval(), None
    keep_norm_eval(tuned)
    tuned.train()
    if variant == "none":
        return tuned, None
    groups = select_blocks(tuned, _SELECTION.get(variant, variant))
    optimizer = torch.optim.Adam(groups, lr=lr)
    return tuned, AutoRGN(optimizer) if variant == "auto_rgn" else optimizer


def _use_batch_statistics(model: nn.Module) -> None:
    """Every BatchNorm normalises with the statistics of the batch it is given, in every mode: running
    statistics dropped (neither used nor updated), affine weights kept."""
    for layer in model.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.track_running_stats = False
            layer.running_mean = None
            layer.running_var = None
            layer.num_batches_tracked = None


class _FixedCopies:
    """``adapt_online``'s ``augment`` when the copies are drawn in advance: the k-th call on a batch
    returns that batch's k-th copy (as activations after the frozen prefix)."""

    def __init__(self) -> None:
        self.batch: torch.Tensor | None = None
        self.copies: torch.Tensor | None = None
        self.calls = 0

    def show(self, batch: torch.Tensor, copies: torch.Tensor) -> None:
        self.batch, self.copies, self.calls = batch, copies, 0

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs is not self.batch or self.copies is None or self.calls >= len(self.copies):
            raise RuntimeError("augment called on another batch, or more often than there are copies")
        self.calls += 1
        return self.copies[self.calls - 1]


def _batches(inputs: torch.Tensor, copies: torch.Tensor | None, batch: int,
             fixed: _FixedCopies) -> Iterator[torch.Tensor]:
    """The stream's batches; with ``copies`` (copies x N x ...), each batch's copies shown to ``fixed``
    before the batch is handed over."""
    for start in range(0, len(inputs), batch):
        rows = inputs[start : start + batch]
        if copies is not None:
            fixed.show(rows, copies[:, start : start + batch])
        yield rows


# ---------------------------------------------------------------------------------- the online pass
@dataclass
class OnlinePass:
    """The adapted model, the logits predicted for each stream image before its batch's update, the labels."""

    model: nn.Module
    logits: torch.Tensor
    labels: torch.Tensor


def _check_task(variant: str, loss: str | None, lr: float | None) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    if variant in UNTUNED and (loss is not None or lr is not None):
        raise ValueError(f"{variant!r} adapts nothing: pass loss=None and lr=None")
    if variant not in UNTUNED and (loss not in LOSSES or lr is None):
        raise ValueError(f"{variant!r} needs a loss among {LOSSES} and an lr, got {loss!r}, {lr!r}")


def online_pass(model: nn.Module, shift: Shift, seed: int, variant: str, loss: str | None, lr: float | None,
                cfg: StreamConfig, *, held_out: bool = False, cache: StreamCache | None = None) -> OnlinePass:
    """One online pass of ``variant`` over the (scored or held-out) stream of ``shift`` and ``seed``, on a
    deep copy of ``model`` (left unchanged). ``cache`` shares the stream and frozen-prefix activations
    with other passes on the same model; the result does not depend on it."""
    _check_task(variant, loss, lr)
    cache = StreamCache() if cache is None else cache
    key = _stream_key(shift, seed, cfg, held_out)
    images, labels = cache.get(
        model, (*key, "images"), lambda: _with_layout(stream_images(shift, seed, cfg, held_out=held_out), cfg))
    tuned, optimizer = _adapting_copy(model, variant, lr, cfg)
    if variant == "bn_stats":  # every activation depends on the batch: nothing to share
        return OnlinePass(tuned, _forward_batches([tuned], images, cfg.batch), labels)
    stages = _stages(tuned)
    numels = cache.get(model, (*key, "numels"), lambda: _boundary_numels(stages, images[:1]))
    start = frozen_prefix(tuned, None)
    while not _storable(numels, start):
        start -= 1
    # computed by this pass's copy before any update (the source's weights), stored under the source model
    inputs = _boundary_activations(cache, model, key, images, stages, numels, start, cfg.batch)
    suffix = nn.Sequential(*stages[start:])
    if optimizer is None:
        return OnlinePass(tuned, _forward_batches([suffix], inputs, cfg.batch), labels)
    fixed = _FixedCopies()
    copies = None
    if loss == "memo":
        copies = _copy_activations(cache, model, key, images, stages, numels, start, cfg, seed, held_out)
    predicted = adapt_online(suffix, optimizer, _batches(inputs, copies, cfg.batch, fixed),
                             loss=_LIBRARY_LOSS[loss], augment=fixed, copies=cfg.copies)  # type: ignore[index]
    return OnlinePass(tuned, torch.cat(list(predicted)), labels)


def _with_layout(stream: tuple[torch.Tensor, torch.Tensor], cfg: StreamConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return _layout(stream[0], cfg), stream[1]


@torch.no_grad()
def _boundary_numels(stages: Sequence[nn.Module], image: torch.Tensor) -> list[int]:
    """Floats per image at each stage boundary (0: the image itself)."""
    numels = [image.numel()]
    for stage in stages:
        image = stage(image)
        numels.append(image.numel())
    return numels


def _copy_activations(cache: StreamCache, model: nn.Module, key: tuple[Any, ...], images: torch.Tensor,
                      stages: Sequence[nn.Module], numels: Sequence[int], boundary: int, cfg: StreamConfig,
                      seed: int, held_out: bool) -> torch.Tensor:
    """MEMO's copies of the whole stream (copies x N x ...), drawn once per stream (seeded), after
    ``stages[:boundary]``; each copy of a batch is a batch of its own, as ``marginal_entropy`` runs them."""
    copies_key = (*key, "copies", cfg.copies)

    def draw() -> torch.Tensor:
        drawn = augmented_copies(images.contiguous(), cfg.copies, _copies_seed(seed, held_out))
        return _layout(drawn.flatten(0, 1), cfg)  # (copies N) x C x H x W: copy k at rows k N .. (k+1) N

    flat = cache.get(model, (*copies_key, "images"), draw)
    acts = _boundary_activations(cache, model, copies_key, flat, stages, numels, boundary, cfg.batch)
    return acts.unflatten(0, (cfg.copies, len(images)))


def run_stream(model: nn.Module, shift: Shift, seed: int, variant: str, loss: str | None, lr: float | None,
               cfg: StreamConfig, *, held_out: bool = False, cache: StreamCache | None = None) -> dict[str, Any]:
    """One online pass (:func:`online_pass`) summarised as a JSON-serialisable dict: online accuracy,
    its curve along the stream, the share of the most predicted class in the last chunk (1.0: collapsed
    onto one class), wall and CPU seconds (``shared_cpu_s`` of them spent filling ``cache``)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    cache = StreamCache() if cache is None else cache
    shared_before = cache.cpu_s
    result = online_pass(model, shift, seed, variant, loss, lr, cfg, held_out=held_out, cache=cache)
    predicted = result.logits.argmax(-1)
    correct = (predicted == result.labels).double()
    last = predicted[-cfg.chunk :]
    return {
        "shift": shift.name, "kind": shift.kind, "seed": seed, "variant": variant, "loss": loss, "lr": lr,
        "held_out": held_out, "stream_seed": stream_seed(seed, held_out), "n": len(correct),
        "online_acc": correct.mean().item(),
        "curve": _curve(correct, cfg.chunk),
        "last_chunk_top_class": torch.bincount(last, minlength=data.NUM_CLASSES).max().item() / len(last),
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
        "shared_cpu_s": cache.cpu_s - shared_before,
    }


def _curve(correct: torch.Tensor, chunk: int) -> dict[str, list[float]]:
    """Accuracy of each consecutive ``chunk`` of the stream and the cumulative accuracy, at each chunk's end."""
    per_chunk = correct.view(-1, chunk).mean(1)
    ends = torch.arange(chunk, len(correct) + 1, chunk)
    cumulative = correct.cumsum(0)[ends - 1] / ends
    return {"position": ends.tolist(), "chunk_acc": per_chunk.tolist(), "cumulative_acc": cumulative.tolist()}


def run_task(model: nn.Module, task: StreamTask, cfg: StreamConfig, cache: StreamCache | None = None) -> dict[str, Any]:
    """:func:`run_stream` of a task (``model``: the source model of ``task.seed``)."""
    return run_stream(model, task.shift, task.seed, task.variant, task.loss, task.lr, cfg, held_out=task.held_out, cache=cache)


# --------------------------------------------------------------------------- the learning-rate choice
LrKey = tuple[str, int, str, str]  # (shift name, seed, variant, loss)


def choose_lr(held_out_results: Sequence[Mapping[str, Any]]) -> dict[LrKey, float]:
    """Per (shift, seed, variant, loss), the lr with the best online accuracy on the held-out stream
    (ties: the smaller lr, the gentler adaptation). Refuses results of a scored stream."""
    best: dict[LrKey, tuple[float, float]] = {}
    for result in held_out_results:
        if not result["held_out"]:
            raise ValueError(f"choose_lr got a scored-stream result ({result['shift']}, {result['variant']}); "
                             "the lr is chosen on the held-out stream only")
        key = (result["shift"], result["seed"], result["variant"], result["loss"])
        candidate = (result["online_acc"], -result["lr"])
        if key not in best or candidate > best[key]:
            best[key] = candidate
    return {key: -negative_lr for key, (_, negative_lr) in best.items()}


def stream_tasks(shifts: Sequence[Shift], seeds: Sequence[int], cfg: StreamConfig) -> list[StreamTask]:
    """The held-out runs that choose the lr: every tuned (variant, loss) x lr (none with a single lr).
    Run these first, then :func:`choose_lr` on their results, then :func:`scored_tasks`."""
    if len(cfg.lrs) == 1:
        return []
    return [StreamTask(shift, seed, variant, loss, lr, held_out=True)
            for shift in shifts for seed in seeds for variant, loss in cfg.tuned_runs() for lr in cfg.lrs]


def scored_tasks(shifts: Sequence[Shift], seeds: Sequence[int], cfg: StreamConfig,
                 chosen: Mapping[LrKey, float]) -> list[StreamTask]:
    """The scored runs: each untuned variant once, each tuned (variant, loss) at its chosen lr."""
    tasks = []
    for shift in shifts:
        for seed in seeds:
            tasks += [StreamTask(shift, seed, variant, None, None) for variant in cfg.variants if variant in UNTUNED]
            for variant, loss in cfg.tuned_runs():
                lr = cfg.lrs[0] if len(cfg.lrs) == 1 else chosen[(shift.name, seed, variant, loss)]
                tasks.append(StreamTask(shift, seed, variant, loss, lr))
    return tasks


def run_stream_experiment(models: Mapping[int, nn.Module], shifts: Sequence[Shift], seeds: Sequence[int],
                          cfg: StreamConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole experiment in this process, in the documented order: held-out runs, lr choice, scored
    runs. ``models[seed]``: the source model of that seed. Returns the results of both streams and the
    chosen lrs (as a list of [shift, seed, variant, loss, lr])."""
    cache = StreamCache()
    held = _run_grouped(models, stream_tasks(shifts, seeds, cfg), cfg, cache, log)
    chosen = choose_lr(held)
    scored = _run_grouped(models, scored_tasks(shifts, seeds, cfg, chosen), cfg, cache, log)
    return {"config": cfg.to_dict(), "held_out": held, "scored": scored,
            "chosen_lr": [[*key, lr] for key, lr in chosen.items()]}


def _run_grouped(models: Mapping[int, nn.Module], tasks: Sequence[StreamTask], cfg: StreamConfig,
                 cache: StreamCache, log: Callable[[str], None] | None) -> list[dict[str, Any]]:
    """Run ``tasks`` (grouped by stream, as the task lists are), clearing ``cache`` between streams."""
    results, stream = [], None
    for task in tasks:
        if (task.shift, task.seed, task.held_out) != stream:
            cache.clear()
            stream = (task.shift, task.seed, task.held_out)
        results.append(run_task(models[task.seed], task, cfg, cache))
        if log is not None:
            r = results[-1]
            log(f"{task.shift.name} seed {task.seed} {task.variant} {task.loss} lr {task.lr} "
                f"{'held-out' if task.held_out else 'scored'}: {r['online_acc']:.3f} ({r['cpu_s']:.1f} CPU-s)")
    return results
