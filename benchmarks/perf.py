"""Cost of the AutoRGN / AutoSNR wrappers relative to the bare optimizer.

``python -m benchmarks.perf [--quick|--tiny] [--device cpu|cuda] [--sync-debug] [--threads N] [--out results/perf/perf.md]``

On the CPU the default is one torch thread (``--threads 0`` keeps torch's choice): on a shared machine a
multi-threaded kernel waits for its slowest thread and the run gets many times slower and noisier,
while the ratios this script reports barely change. ``--tiny`` is the smoke test's toy size.

Everything is measured side by side in one process: in each repeat every variant is timed once,
in an order rotated from repeat to repeat, so slow drifts of a shared machine hit all variants
alike. Reported are the median time of each variant and the median of the per-repeat ratios
(variant / bare optimizer in the same repeat), with the spread (25th-75th percentile) of those
ratios as a noise indication. The script never asserts speed; it reports against the overhead targets of ``targets()``.

Sections:

1. ``step``       - ``AutoRGN(inner).step()`` (default: multipliers folded into torch's update),
                    ``AutoRGN(inner, update="scaled_step").step()`` (the any-optimizer path) and
                    ``AutoSNR(inner).step()`` (steady state after the
                    calibration steps; the calibration steps are timed separately) vs ``inner.step()``
                    for SGD(momentum=0.9), Adam and AdamW (foreach=True), random weights, random
                    gradients set directly on ``.grad``.
2. ``official``   - the statistics computed as the official code does (``.item()`` norms, one param
                    group per tensor with lr x weight, Adam re-created whenever the weights are
                    recomputed: here every step) vs ``AutoRGN(Adam).step()``.
3. ``train_step`` - a whole training step (zero_grad, forward, backward, step) with and without the
                    wrapper; the step part is also timed inside it.
4. ``scaling``    - step cost vs number of tensors (64 elements each) and vs MLP width.
5. ``memory``     - bytes the wrappers keep (AutoRGN's snapshot buffers: none when folding; AutoSNR's moment sums
                    during calibration) relative to the parameter bytes; on CUDA also
                    ``torch.cuda.max_memory_allocated`` deltas.

With ``--sync-debug`` on CUDA, ``torch.cuda.set_sync_debug_mode("error")`` is active around every
timed wrapper ``step()`` call after warm-up; violations are listed in the report and make the exit
status 1 (steady-state steps) - calibration steps are reported separately.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from surgical_optim import AutoRGN, AutoSNR

SECTIONS = ("step", "official", "train_step", "scaling", "memory")
OPTIMIZERS = ("sgd", "adam", "adamw")
TARGET_STEP_RATIO = 1.5  # AutoRGN(AdamW).step <= 1.5 x AdamW(foreach).step on CPU
TARGET_FOLD_RATIO = 1.25  # ... and <= 1.25 x where the multipliers are folded into the update
TARGET_TRAIN_OVERHEAD = 0.02  # whole training step overhead <= 2 %
TARGET_MEMORY = 1.0  # extra memory <= one copy of the parameters


# ----------------------------------------------------------------------------------------- config
@dataclass
class Config:
    quick: bool
    tiny: bool
    device: str
    sync_debug: bool
    repeats: int
    calibration_repeats: int
    samples: int
    snr_threshold: float
    step_models: list[str]
    official_model: str
    train_models: list[tuple[str, int, int]]  # (model, image size, batch)
    tensor_counts: list[int]
    tensor_numel: int
    mlp_widths: list[int]
    mlp_depth: int
    min_block_s: float  # a timed block of steps lasts at least this long (small problems)
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))


def make_config(args: argparse.Namespace) -> Config:
    if args.quick or args.tiny:
        cfg = Config(
            quick=True, tiny=args.tiny, device=args.device, sync_debug=args.sync_debug, repeats=3, calibration_repeats=2,
            samples=args.samples, snr_threshold=args.snr_threshold,
            step_models=["resnet18", "vit_small"], official_model="resnet18",
            train_models=[("resnet18", 32, 4)], tensor_counts=[10, 100], tensor_numel=64,
            mlp_widths=[32, 128], mlp_depth=4, min_block_s=0.002,
        )
    else:
        cfg = Config(
            quick=False, tiny=False, device=args.device, sync_debug=args.sync_debug, repeats=7, calibration_repeats=3,
            samples=args.samples, snr_threshold=args.snr_threshold,
            step_models=["resnet50", "vit_b_16"], official_model="resnet50",
            train_models=[("resnet18", 64, 16), ("resnet50", 64, 16)],
            tensor_counts=[10, 100, 1000, 10000], tensor_numel=64,
            mlp_widths=[128, 512, 1024, 2048], mlp_depth=4, min_block_s=0.03,
        )
    if args.tiny:  # the smoke test: seconds, not a measurement
        cfg.repeats, cfg.calibration_repeats, cfg.min_block_s = 2, 1, 0.0
        cfg.step_models, cfg.official_model = ["vit_small"], "vit_small"
        cfg.train_models = [("vit_small", 32, 2)]
        cfg.tensor_counts, cfg.mlp_widths, cfg.mlp_depth = [4, 16], [8, 16], 2
    if args.repeats is not None:
        cfg.repeats = max(1, args.repeats)
        cfg.calibration_repeats = max(1, min(cfg.calibration_repeats, cfg.repeats))
    if args.sections:
        wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(SECTIONS))
        if unknown:
            raise SystemExit(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
        cfg.sections = [s for s in SECTIONS if s in wanted]
    if args.tensor_counts:
        cfg.tensor_counts = [int(v) for v in args.tensor_counts.split(",")]
    return cfg


# ----------------------------------------------------------------------------------------- models
def build_model(name: str) -> torch.nn.Module:
    import torchvision

    models = torchvision.models
    if name == "resnet18":
        return models.resnet18()
    if name == "resnet50":
        return models.resnet50()
    if name == "vit_b_16":
        return models.vit_b_16()
    if name == "vit_small":  # a small VisionTransformer for --quick
        return models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
        )
    raise ValueError(f"unknown model {name!r}")


def make_mlp(width: int, depth: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def make_inner(kind: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-4, foreach=True)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, foreach=True)
    raise ValueError(kind)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def random_grads(params: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [(torch.randn(p.shape, generator=gen) * 1e-3).to(p.device, p.dtype) for p in params]


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g


# ----------------------------------------------------------------------------------------- timing
class Timer:
    """Wall-clock timing with device synchronisation outside the timed call, plus sync-debug guards."""

    def __init__(self, device: torch.device, sync_debug: bool) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.sync_debug = sync_debug and self.cuda
        self.violations: list[dict[str, str]] = []
        self._disabled: set[str] = set()
        self.guarded_calls: dict[str, int] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def guard(self, label: str | None) -> Iterator[None]:
        """``set_sync_debug_mode("error")`` around a wrapper's step calls (CUDA + --sync-debug only)."""
        if not self.sync_debug or label is None or label in self._disabled:
            yield
            return
        self.guarded_calls[label] = self.guarded_calls.get(label, 0) + 1
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        except RuntimeError as error:  # record, stop guarding this label, keep measuring
            self.violations.append({"label": label, "error": str(error).splitlines()[0][:300]})
            self._disabled.add(label)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def block(self, fn: Callable[[], Any], steps: int, label: str | None = None) -> float:
        """Seconds per call of ``fn``, over ``steps`` consecutive calls."""
        self.sync()
        start = time.perf_counter()
        with self.guard(label):
            for _ in range(steps):
                fn()
        self.sync()
        return (time.perf_counter() - start) / steps


@dataclass
class Variant:
    name: str
    run: Callable[[], Any]
    setup: Callable[[], Any] | None = None  # untimed, before each repeat's block
    steps: int = 1
    guard: str | None = None  # sync-debug label (wrapper steps only)
    repeats: int | None = None  # fewer repeats than the others (calibration)
    phases: dict[str, Any] | None = None  # per-step times of the calibration blocks


def interleave(variants: list[Variant], repeats: int, timer: Timer) -> dict[str, list[float | None]]:
    """Per variant, seconds per step in each repeat (None where a variant sat a repeat out)."""
    times: dict[str, list[float | None]] = {v.name: [] for v in variants}
    for r in range(repeats):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            if v.repeats is not None and r >= v.repeats:
                continue
            if v.setup is not None:
                v.setup()
            times[v.name].append(timer.block(v.run, v.steps, v.guard))
        for v in variants:
            if len(times[v.name]) < r + 1:
                times[v.name].append(None)
    return times


def steps_for(seconds_per_step: float, cfg: Config, cap: int = 200) -> int:
    return max(1, min(cap, math.ceil(cfg.min_block_s / max(seconds_per_step, 1e-7))))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarise(times: dict[str, list[float | None]], base: str) -> dict[str, dict[str, float]]:
    """Median seconds per variant; median and p25-p75 of per-repeat ratios to ``base``."""
    out: dict[str, dict[str, float]] = {}
    for name, values in times.items():
        present = [v for v in values if v is not None]
        ratios = [v / b for v, b in zip(values, times[base]) if v is not None and b is not None and b > 0]
        out[name] = {
            "median_ms": statistics.median(present) * 1e3,
            "ratio": statistics.median(ratios),
            "ratio_p25": quantile(ratios, 0.25),
            "ratio_p75": quantile(ratios, 0.75),
            "n": len(present),
        }
    return out


# ----------------------------------------------------------------------------------------- section 1 (+5)
def cuda_peak(fn: Callable[[], Any], device: torch.device) -> tuple[int, int]:
    """(peak bytes above the starting allocation, bytes still allocated afterwards above it)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base, torch.cuda.memory_allocated(device) - base


def calibration_phases(variants: list[Variant], times: dict[str, list[float | None]], samples: int) -> None:
    """Add the calibration's phases (per repeat, aligned with the other variants) to ``times``."""
    holder = next((v.phases for v in variants if v.phases is not None), None)
    if holder is None:
        return
    blocks = holder["blocks"]
    names = {"first": "AutoSNR calibration: step 1 (allocates moments)",
             "middle": f"AutoSNR calibration: steps 2-{samples - 1} (collect)",
             "last": f"AutoSNR calibration: step {samples} (collect + estimate)"}
    for key, name in names.items():
        values: list[float | None] = []
        for r in range(len(times["bare"])):
            block = blocks[r] if r < len(blocks) and len(blocks[r]) == samples else None
            if block is None:
                values.append(None)
            elif key == "first":
                values.append(block[0])
            elif key == "last":
                values.append(block[-1])
            else:
                values.append(statistics.fmean(block[1:-1]) if samples > 2 else None)
        if any(v is not None for v in values):
            times[name] = values


def wrapper_step_variants(
    inner: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor], cfg: Config,
    timer: Timer, section: str, steps: int, with_calibration: bool = True,
) -> tuple[list[Variant], tuple[AutoRGN, AutoRGN], AutoSNR]:
    """bare / AutoRGN (folded and snapshot) / AutoSNR steady state (+ AutoSNR calibration), warmed
    up, sharing ``inner``."""
    set_grads(params, grads)
    rgn = AutoRGN(inner)
    rgn_snapshot = AutoRGN(inner, update="scaled_step")
    snr = AutoSNR(inner, threshold=cfg.snr_threshold, samples=cfg.samples)
    for _ in range(2):  # inner state and snapshot buffers allocated, plans cached
        inner.step()
        rgn.step()
        rgn_snapshot.step()
    if not rgn.last_step_folded:  # the numbers below would silently describe the wrong path
        raise RuntimeError(f"AutoRGN did not fold its update into {type(inner).__name__}")
    for _ in range(cfg.samples + 1):  # calibration, then the step that applies the mask
        snr.step()
    set_grads(params, grads)  # a frozen tensor's gradient was dropped
    if any(p.grad is None for p in params):
        raise RuntimeError("AutoSNR froze tensors; the steady-state timing needs them all (use threshold 0)")
    restore = (lambda: set_grads(params, grads))
    variants = [
        Variant("bare", inner.step, setup=restore, steps=steps),
        Variant("AutoRGN", rgn.step, setup=restore, steps=steps, guard=f"{section}:AutoRGN"),
        Variant("AutoRGN snapshot", rgn_snapshot.step, setup=restore, steps=steps,
                guard=f"{section}:AutoRGN snapshot"),
        Variant("AutoSNR", snr.step, setup=restore, steps=steps, guard=f"{section}:AutoSNR"),
    ]
    if with_calibration:
        holder: dict[str, Any] = {"blocks": []}
        label = f"{section}:AutoSNR calibration"

        def fresh_calibration() -> None:
            set_grads(params, grads)
            holder.pop("snr", None)
            holder["snr"] = AutoSNR(inner, threshold=cfg.snr_threshold, samples=cfg.samples)
            holder["blocks"].append([])

        def calibration_step() -> None:  # each step timed too: the first allocates, the last estimates
            timer.sync()
            start = time.perf_counter()
            with timer.guard(label):
                holder["snr"].step()
            timer.sync()
            holder["blocks"][-1].append(time.perf_counter() - start)

        variants.append(
            Variant("AutoSNR calibration", calibration_step, setup=fresh_calibration, steps=cfg.samples,
                    repeats=cfg.calibration_repeats, phases=holder)
        )
    return variants, (rgn, rgn_snapshot), snr


def section_step(cfg: Config, device: torch.device, timer: Timer, log) -> tuple[list[dict], list[dict]]:
    rows: list[dict] = []
    memory_rows: list[dict] = []
    for model_name in cfg.step_models:
        torch.manual_seed(0)
        model = build_model(model_name).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = random_grads(params)
        pbytes = tensor_bytes(params)
        for kind in OPTIMIZERS:
            inner = make_inner(kind, params)
            set_grads(params, grads)
            inner.step()
            one = timer.block(inner.step, 1)
            steps = steps_for(one, cfg, cap=20)
            variants, rgn, snr = wrapper_step_variants(inner, params, grads, cfg, timer, "step", steps)
            times = interleave(variants, cfg.repeats, timer)
            calibration_phases(variants, times, cfg.samples)
            summary = summarise(times, "bare")
            for name, s in summary.items():
                rows.append({"model": model_name, "params_M": round(sum(p.numel() for p in params) / 1e6, 2),
                             "tensors": len(params), "optimizer": kind, "variant": name, **s})
            log(f"step {model_name} {kind}: " + ", ".join(f"{n} {s['ratio']:.2f}x" for n, s in summary.items()))
            if kind == "adamw" and "memory" in cfg.sections:
                memory_rows.append(memory_row(model_name, inner, params, grads, pbytes, rgn, cfg, device))
            del variants, rgn, snr, inner
    return rows, memory_rows


def memory_row(model_name, inner, params, grads, pbytes, rgn, cfg, device) -> dict:
    row: dict[str, Any] = {"model": model_name, "param_MB": pbytes / 2**20}
    folded, snapshot = rgn
    for label, wrapper in (("fold", folded), ("snapshot", snapshot)):
        kept = tensor_bytes(wrapper._snapshots.values())
        row[f"AutoRGN_{label}_MB"] = kept / 2**20
        row[f"ratio_AutoRGN_{label}"] = kept / pbytes
    set_grads(params, grads)
    calib = AutoSNR(inner, threshold=cfg.snr_threshold, samples=cfg.samples)
    calib.step()  # first calibration step allocates the moment sums
    moments = tensor_bytes(calib._sums) + tensor_bytes(calib._squares)
    row["AutoSNR_calibration_MB"] = moments / 2**20
    row["ratio_AutoSNR_calibration"] = moments / pbytes
    del calib
    if device.type == "cuda":
        set_grads(params, grads)
        bare_peak, _ = cuda_peak(inner.step, device)
        fresh = AutoRGN(inner, update="scaled_step")
        rgn_first_peak, rgn_kept = cuda_peak(fresh.step, device)
        rgn_steady_peak, _ = cuda_peak(fresh.step, device)
        del fresh
        fresh = AutoRGN(inner)  # inner already has its state: folds from its first step
        fold_peak, _ = cuda_peak(fresh.step, device)
        del fresh
        calib = AutoSNR(inner, threshold=cfg.snr_threshold, samples=cfg.samples)
        snr_peaks = [cuda_peak(calib.step, device) for _ in range(cfg.samples)]
        snr_peak = max(p for p, _ in snr_peaks)
        del calib
        row["cuda_bare_step_peak_MB"] = bare_peak / 2**20
        row["cuda_AutoRGN_first_step_peak_MB"] = rgn_first_peak / 2**20
        row["cuda_AutoRGN_kept_MB"] = rgn_kept / 2**20
        row["cuda_AutoRGN_steady_peak_MB"] = rgn_steady_peak / 2**20
        row["cuda_AutoSNR_calibration_peak_MB"] = snr_peak / 2**20
        row["cuda_AutoRGN_fold_peak_MB"] = fold_peak / 2**20
        row["ratio_cuda_AutoRGN_extra_peak"] = max(rgn_first_peak - bare_peak, 0) / pbytes
        row["ratio_cuda_AutoRGN_fold_extra_peak"] = max(fold_peak - bare_peak, 0) / pbytes
        row["ratio_cuda_AutoSNR_extra_peak"] = max(snr_peak - bare_peak, 0) / pbytes
    return row


# ----------------------------------------------------------------------------------------- section 2
def official_weights(params: list[torch.Tensor]) -> list[float]:
    """As the official code does it: per-tensor host-side norms (two ``.item()`` each), max-normalised."""
    weights = []
    for p in params:
        g_norm = p.grad.norm().item()
        w_norm = p.norm().item()
        weights.append(g_norm / w_norm if w_norm > 0 else 0.0)  # zero-init BN biases: no division by 0
    largest = max(weights)
    return [w / largest for w in weights]


def official_style_step(params: list[torch.Tensor], lr: float) -> None:
    """Weights, one param group per tensor with lr x weight, a fresh (default) Adam, one step."""
    groups = [{"params": [p], "lr": lr * w} for p, w in zip(params, official_weights(params))]
    torch.optim.Adam(groups, lr=lr).step()


def official_weights_only(params: list[torch.Tensor]) -> None:
    official_weights(params)


def section_official(cfg: Config, device: torch.device, timer: Timer, log) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(cfg.official_model).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = random_grads(params)
    set_grads(params, grads)
    lr = 1e-4
    inner = torch.optim.Adam(params, lr=lr, foreach=True)
    ours = AutoRGN(inner)
    for _ in range(2):
        inner.step()
        ours.step()
        official_style_step(params, lr)
    one = timer.block(lambda: official_style_step(params, lr), 1)
    steps = steps_for(one, cfg, cap=20)
    variants = [
        Variant("bare Adam(foreach)", inner.step, steps=steps),
        Variant("ours AutoRGN(Adam(foreach))", ours.step, steps=steps, guard="official:AutoRGN"),
        Variant("official: weights + rebuild + step", lambda: official_style_step(params, lr), steps=steps),
        Variant("official: weights only", lambda: official_weights_only(params), steps=steps),
    ]
    times = interleave(variants, cfg.repeats, timer)
    summary = summarise(times, "ours AutoRGN(Adam(foreach))")
    rows = [{"model": cfg.official_model, "tensors": len(params), "variant": n, **s} for n, s in summary.items()]
    log("official: " + ", ".join(f"{n} {s['median_ms']:.1f} ms" for n, s in summary.items()))
    return rows


# ----------------------------------------------------------------------------------------- section 3
def section_train_step(cfg: Config, device: torch.device, timer: Timer, log) -> list[dict]:
    rows = []
    for model_name, size, batch in cfg.train_models:
        rows += train_step_rows(model_name, size, batch, cfg, device, timer, log)
    return rows


def train_step_rows(
    model_name: str, size: int, batch: int, cfg: Config, device: torch.device, timer: Timer, log
) -> list[dict]:
    """Whole training steps of one model, bare and wrapped, interleaved."""
    model, params, x, y = _training_batch(model_name, size, batch, device)
    inner = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, foreach=True)
    rgn = AutoRGN(inner)
    rgn_snapshot = AutoRGN(inner, update="scaled_step")
    snr = AutoSNR(inner, threshold=cfg.snr_threshold, samples=cfg.samples)
    step_times: dict[str, list[float]] = {"bare": [], "AutoRGN": [], "AutoRGN snapshot": [], "AutoSNR": []}

    def train_step(opt: torch.optim.Optimizer, name: str, guard: str | None, record: bool = True) -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        timer.sync()
        start = time.perf_counter()
        with timer.guard(guard if record else None):
            opt.step()
        timer.sync()
        if record:
            step_times[name].append(time.perf_counter() - start)

    for _ in range(2):  # warm-up (inner state, snapshots), then AutoSNR's calibration
        train_step(inner, "bare", None, False)
        train_step(rgn, "AutoRGN", None, False)
        train_step(rgn_snapshot, "AutoRGN snapshot", None, False)
    for _ in range(cfg.samples + 1):
        train_step(snr, "AutoSNR", None, False)
    variants = [
        Variant("bare", lambda: train_step(inner, "bare", None)),
        Variant("AutoRGN", lambda: train_step(rgn, "AutoRGN", "train_step:AutoRGN")),
        Variant("AutoRGN snapshot",
                lambda: train_step(rgn_snapshot, "AutoRGN snapshot", "train_step:AutoRGN snapshot")),
        Variant("AutoSNR", lambda: train_step(snr, "AutoSNR", "train_step:AutoSNR")),
    ]
    summary = summarise(interleave(variants, cfg.repeats, timer), "bare")
    log(f"train_step {model_name}: " + ", ".join(f"{n} {s['ratio']:.3f}x" for n, s in summary.items()))
    return _train_step_table(model_name, f"{batch}x3x{size}x{size}", summary, step_times)


def _training_batch(model_name: str, size: int, batch: int,
                    device: torch.device) -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The model in train mode, its trainable parameters, and one fixed random batch."""
    torch.manual_seed(0)
    model = build_model(model_name).to(device).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    model.train()
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return model, params, x, y


def _train_step_table(model_name: str, shape: str, summary: dict[str, dict[str, Any]],
                      step_times: dict[str, list[float]]) -> list[dict]:
    whole_bare = summary["bare"]["median_ms"] / 1e3
    bare_step = statistics.median(step_times["bare"])
    rows = []
    for name, s in summary.items():
        step_median = statistics.median(step_times[name])
        rows.append({
            "model": model_name, "input": shape, "variant": name, **s,
            "step_part_ms": step_median * 1e3,
            # (wrapper step - bare step) / bare whole step: the overhead with less noise than the
            # whole-step ratio, since forward/backward noise cancels out
            "derived_overhead": (step_median - bare_step) / whole_bare,
        })
    return rows


# ----------------------------------------------------------------------------------------- section 4
def scaling_rows(label: str, value: int, params: list[torch.Tensor], cfg: Config, timer: Timer) -> list[dict]:
    grads = random_grads(params)
    inner = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, foreach=True)
    set_grads(params, grads)
    inner.step()
    one = statistics.median(timer.block(inner.step, 1) for _ in range(3))
    steps = steps_for(one, cfg)
    variants, _, _ = wrapper_step_variants(inner, params, grads, cfg, timer, "scaling", steps, with_calibration=False)
    times = interleave(variants, cfg.repeats, timer)
    summary = summarise(times, "bare")
    return [{label: value, "tensors": len(params), "elements": sum(p.numel() for p in params),
             "steps_per_block": steps, "variant": n, **s} for n, s in summary.items()]


def section_scaling(cfg: Config, device: torch.device, timer: Timer, log) -> tuple[list[dict], list[dict]]:
    by_count, by_width = [], []
    for count in cfg.tensor_counts:
        gen = torch.Generator().manual_seed(count)
        params = [torch.nn.Parameter(torch.randn(cfg.tensor_numel, generator=gen).to(device)) for _ in range(count)]
        rows = scaling_rows("n_tensors", count, params, cfg, timer)
        by_count += rows
        log(f"scaling n={count}: " + ", ".join(f"{r['variant']} {r['ratio']:.3f}x" for r in rows))
    for width in cfg.mlp_widths:
        torch.manual_seed(width)
        params = list(make_mlp(width, cfg.mlp_depth).to(device).parameters())
        rows = scaling_rows("width", width, params, cfg, timer)
        by_width += rows
        log(f"scaling width={width}: " + ", ".join(f"{r['variant']} {r['ratio']:.3f}x" for r in rows))
    return by_count, by_width


# ----------------------------------------------------------------------------------------- report
def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "git_commit": commit,
        "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    with contextlib.suppress(Exception):
        import torchvision

        info["torchvision"] = torchvision.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ratio_cell(s: dict) -> str:
    return f"{s['ratio']:.3f} ({s['ratio_p25']:.2f}-{s['ratio_p75']:.2f})"


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _render_header(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    cfg = result["config"]
    out = [
        "# surgical-optim wrapper overhead" + (" (--tiny)" if cfg["tiny"] else " (--quick)" if cfg["quick"] else ""),
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores ({m['cpu_affinity']} usable, torch threads "
        f"{m['torch_threads']}), torch {m['torch']}, torchvision {m.get('torchvision', '?')}, "
        f"device **{m['device']}**{' (' + m['gpu'] + ')' if 'gpu' in m else ''}, python {m['python']}, "
        f"commit {m['git_commit']}, {m['date_utc']}.",
        f"Load average (1/5/15 min) at start {m['load_avg_start']}, at end {m.get('load_avg_end')}; "
        f"total run {result['elapsed_s']:.0f} s.",
        "",
        f"Method: variants interleaved within each of {cfg['repeats']} repeats (order rotated per repeat); "
        "times are medians over repeats, ratios are the median of per-repeat ratios with the 25th-75th "
        "percentile in brackets. A shared, loaded machine inflates the spread; read ratios, not times. "
        f"AutoSNR uses threshold {cfg['snr_threshold']} (nothing frozen: its pure cost) and samples "
        f"{cfg['samples']}.",
        "",
    ]
    return out


def _render_step(sec: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Section 1: the optimizer step, wrapper vs bare."""
    out: list[str] = []
    out += ["## 1. Optimizer step: wrapper vs bare inner step", "",
            "Random weights, random gradients set on `.grad`; inner optimizers foreach=True. "
            "`AutoSNR calibration` = mean of its first "
            f"{cfg['samples']} steps (moments collected; the last one estimates the mask) with a fresh "
            "wrapper in each of the first "
            f"{cfg['calibration_repeats']} repeats, then the same steps by phase.", ""]
    out += table(
        ["model", "params (M)", "tensors", "optimizer", "variant", "median ms", "ratio vs bare (p25-p75)"],
        [[r["model"], r["params_M"], r["tensors"], r["optimizer"], r["variant"], r["median_ms"],
          ratio_cell(r)] for r in sec["step"]],
    )
    return out


def _render_official(sec: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Section 2: the official code's statistics vs ours."""
    out: list[str] = []
    out += ["## 2. Official-style statistics vs ours", "",
            "Official style: per-tensor `g.norm().item() / p.norm().item()`, normalised by the max, one "
            "param group per tensor with lr x weight, `torch.optim.Adam` re-created (default settings, "
            "fresh state) every step, then its step. Ratios are relative to ours, "
            "`AutoRGN(Adam(foreach=True)).step()`.", ""]
    out += table(["model", "tensors", "variant", "median ms", "ratio vs ours (p25-p75)"],
                 [[r["model"], r["tensors"], r["variant"], r["median_ms"], ratio_cell(r)]
                  for r in sec["official"]])
    return out


def _render_train_step(sec: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Section 3: the whole training step."""
    out: list[str] = []
    out += ["## 3. Whole training step (zero_grad + forward + backward + step), AdamW(foreach)", "",
            "`derived overhead` = (median wrapper step part - median bare step part) / median bare whole "
            "step, the step parts timed inside the same whole steps (less noisy than the whole-step "
            "ratio).", ""]
    out += table(["model", "input", "variant", "whole step ms", "ratio vs bare (p25-p75)", "step part ms",
                  "derived overhead"],
                 [[r["model"], r["input"], r["variant"], r["median_ms"], ratio_cell(r), r["step_part_ms"],
                   f"{100 * r['derived_overhead']:+.1f} %"] for r in sec["train_step"]])
    return out


def _render_scaling(sec: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Section 4: scaling with the number of tensors and the model size."""
    out: list[str] = []
    out += ["## 4. Scaling, AdamW(foreach)", "",
            f"### vs number of tensors ({cfg['tensor_numel']} elements each)", ""]
    out += table(["tensors", "steps/block", "variant", "median ms", "ratio vs bare (p25-p75)"],
                 [[r["n_tensors"], r["steps_per_block"], r["variant"], r["median_ms"], ratio_cell(r)]
                  for r in sec["scaling_tensors"]])
    out += [f"### vs model size (MLP, {cfg['mlp_depth']} Linear layers of width w)", ""]
    out += table(["width", "elements", "variant", "median ms", "ratio vs bare (p25-p75)"],
                 [[r["width"], r["elements"], r["variant"], r["median_ms"], ratio_cell(r)]
                  for r in sec["scaling_width"]])
    return out


def _render_memory(sec: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Section 5: the wrappers' own memory."""
    out: list[str] = []
    out += ["## 5. Memory kept by the wrappers (AdamW)", "",
            "Counted bytes of the wrappers' own buffers after warm-up: AutoRGN's snapshots (none when "
            "the update is folded; one copy, kept for the whole run, on the snapshot path), "
            "AutoSNR's `_sums` + `_squares` (held during calibration only), relative to the parameter "
            "bytes.", ""]
    headers = ["model", "param MB", "AutoRGN (fold) MB", "ratio", "AutoRGN snapshot MB", "ratio",
               "AutoSNR calibration MB", "ratio"]
    cuda = any("cuda_bare_step_peak_MB" in r for r in sec["memory"])
    if cuda:
        headers += ["CUDA peak: bare step MB", "AutoRGN fold step MB", "AutoRGN snapshot 1st step MB",
                    "AutoSNR calib MB", "extra peak fold / params", "extra peak snapshot / params",
                    "extra peak AutoSNR / params"]
    rows = []
    for r in sec["memory"]:
        row = [r["model"], r["param_MB"], r["AutoRGN_fold_MB"], r["ratio_AutoRGN_fold"],
               r["AutoRGN_snapshot_MB"], r["ratio_AutoRGN_snapshot"],
               r["AutoSNR_calibration_MB"], r["ratio_AutoSNR_calibration"]]
        if cuda:
            row += [r["cuda_bare_step_peak_MB"], r["cuda_AutoRGN_fold_peak_MB"],
                    r["cuda_AutoRGN_first_step_peak_MB"], r["cuda_AutoSNR_calibration_peak_MB"],
                    r["ratio_cuda_AutoRGN_fold_extra_peak"], r["ratio_cuda_AutoRGN_extra_peak"],
                    r["ratio_cuda_AutoSNR_extra_peak"]]
        rows.append(row)
    out += table(headers, rows)
    return out


def _render_closing(result: dict[str, Any]) -> list[str]:
    """The targets table and, with --sync-debug, the synchronisation report."""
    out: list[str] = []
    out += ["## Targets", ""]
    out += table(["target", "measured", "met"], [[t["target"], t["measured"], t["met"]] for t in result["targets"]])
    if result["sync_debug"]["enabled"]:
        sd = result["sync_debug"]
        out += ["## Sync debug (`torch.cuda.set_sync_debug_mode('error')` around wrapper steps)", ""]
        out += [f"Guarded blocks per label: {sd['guarded_calls']}", ""]
        if sd["violations"]:
            out += table(["label", "error"], [[v["label"], v["error"]] for v in sd["violations"]])
        else:
            out += ["No synchronisation raised.", ""]
    return out


def render(result: dict[str, Any]) -> str:
    """The Markdown report of a result."""
    cfg, sec = result["config"], result["sections"]
    out = _render_header(result)
    for key, section in (("step", _render_step), ("official", _render_official), ("train_step", _render_train_step),
                         ("scaling_tensors", _render_scaling), ("memory", _render_memory)):
        if key in sec:
            out += section(sec, cfg)
    out += _render_closing(result)
    return "\n".join(out)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    sec = result["sections"]
    rows: list[dict[str, Any]] = []
    for r in sec.get("step", []):
        if r["optimizer"] == "adamw" and r["variant"] in ("AutoRGN", "AutoRGN snapshot"):
            limit = TARGET_FOLD_RATIO if r["variant"] == "AutoRGN" else TARGET_STEP_RATIO
            label = "AutoRGN(AdamW) folded" if r["variant"] == "AutoRGN" else "AutoRGN(AdamW, update='scaled_step')"
            rows.append({"target": f"{label}.step <= {limit}x AdamW(foreach).step, {r['model']}",
                         "measured": f"{r['ratio']:.3f}x", "met": r["ratio"] <= limit})
    for r in sec.get("train_step", []):
        if r["variant"] != "bare":
            rows.append({"target": f"whole-step overhead <= {100 * TARGET_TRAIN_OVERHEAD:.0f} %, "
                                   f"{r['variant']}, {r['model']}",
                         "measured": f"ratio {r['ratio']:.3f} / derived {100 * r['derived_overhead']:+.1f} %",
                         "met": r["derived_overhead"] <= TARGET_TRAIN_OVERHEAD})
    for r in sec.get("memory", []):
        for key, label in (("ratio_AutoRGN_fold", "AutoRGN folded"), ("ratio_AutoRGN_snapshot", "AutoRGN snapshots"),
                           ("ratio_AutoSNR_calibration", "AutoSNR calibration moments")):
            rows.append({"target": f"extra memory <= 1 copy of params, {label}, {r['model']}",
                         "measured": f"{r[key]:.2f} copies", "met": r[key] <= TARGET_MEMORY + 1e-9})
    return rows


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models and sizes, few repeats")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sync-debug", action="store_true",
                        help="CUDA: set_sync_debug_mode('error') around the wrappers' step calls after warm-up")
    parser.add_argument("--out", default="results/perf/perf.md", help="Markdown report; the JSON goes beside it")
    parser.add_argument("--repeats", type=int, default=None, help="override the number of repeats")
    parser.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--tensor-counts", default=None, help="override the scaling tensor counts, e.g. 10,100")
    parser.add_argument("--samples", type=int, default=5, help="AutoSNR calibration samples (steps)")
    parser.add_argument("--snr-threshold", type=float, default=0.0,
                        help="AutoSNR threshold (default 0: nothing frozen, so the pure wrapper cost is measured)")
    parser.add_argument("--tiny", action="store_true", help="--quick with toy sizes (the smoke test)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads; default 1 on --device cpu (robust on a shared machine: "
                             "ratios, not absolute speed, are the point), torch's own choice on cuda; 0 = torch's choice")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    previous_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return run(args, cfg, device)
    finally:
        torch.set_num_threads(previous_threads)  # main() is also called in-process (the smoke test)


def run(args: argparse.Namespace, cfg: Config, device: torch.device) -> int:
    timer = Timer(device, cfg.sync_debug)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[perf {time.strftime('%H:%M:%S')}] {msg}", flush=True))
    started = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info(device), "config": asdict(cfg), "sections": {}}
    sec = result["sections"]
    if "step" in cfg.sections or "memory" in cfg.sections:
        step_rows, memory_rows = section_step(cfg, device, timer, log)
        if "step" in cfg.sections:
            sec["step"] = step_rows
        if "memory" in cfg.sections:
            sec["memory"] = memory_rows
    if "official" in cfg.sections:
        sec["official"] = section_official(cfg, device, timer, log)
    if "train_step" in cfg.sections:
        sec["train_step"] = section_train_step(cfg, device, timer, log)
    if "scaling" in cfg.sections:
        sec["scaling_tensors"], sec["scaling_width"] = section_scaling(cfg, device, timer, log)
    result["machine"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["elapsed_s"] = time.perf_counter() - started
    result["targets"] = targets(result)
    steady_violations = [v for v in timer.violations if "calibration" not in v["label"]]
    result["sync_debug"] = {"enabled": timer.sync_debug, "guarded_calls": timer.guarded_calls,
                            "violations": timer.violations}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(result) + "\n")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    log(f"wrote {out} and {out.with_suffix('.json')} in {result['elapsed_s']:.0f} s")
    if not args.quiet:
        print(out.read_text())
    if timer.violations:
        print(f"sync-debug violations: {timer.violations}", file=sys.stderr)
    return 1 if steady_violations else 0


if __name__ == "__main__":
    sys.exit(main())
