"""Run every (shift, seed, method) of the offline experiment through the shared protocol, with caching.

Each finished run is written atomically (temp file + rename) to
``<out>/cache/runs/<shift>/<seed>/<method>-<hash>.json``, the hash covering everything the run depends on
(source model, shift, seed, method, protocol settings); re-running skips finished runs, so an interrupted
run loses at most the runs in flight. Runs go to ``workers`` processes (one CPU thread each).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from ..protocol import PrefixCache, ProtocolConfig, finetune
from ..runs import atomic_write_text, config_hash, read_json
from .pretrain import PretrainConfig, load_or_pretrain, load_source
from .shifts import SHIFTS, Shift, calibrate_noise, noise_shifts, perturb_block, target_splits
from .theory import TwoLayerConfig, run_two_layer

__all__ = ["METHODS", "OfflineConfig", "quick_config", "run", "Task"]

#: columns of the table, in order
METHODS: tuple[str, ...] = ("none", "all", "stem", "layer1", "layer2", "layer3", "layer4", "fc", "auto_rgn", "auto_snr")
BLOCKS: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")
#: rough relative cost of one run (full fine-tuning = 1), to order the work
_COST = {"none": 0.02, "fc": 0.08, "layer4": 0.3, "layer3": 0.4, "layer2": 0.55, "layer1": 0.8}

RUN_VERSION = 1  # bump when the protocol changes in a way the hash does not see


@dataclass
class OfflineConfig:
    out_dir: str = "results/offline"
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    per_class: int = 25
    val_per_class: int = 10
    test_per_class: int = 100
    lrs: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
    epochs: int = 15
    workers: int = 2
    #: per-block noise scales of the block-noise experiment; None: calibrated (shifts.calibrate_noise)
    noise_scales: dict[str, float] | None = None
    auto_snr: dict[str, Any] = field(default_factory=lambda: {"threshold": 0.5, "samples": 5})
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    two_layer: TwoLayerConfig = field(default_factory=TwoLayerConfig)
    quick: bool = False

    def protocol(self) -> ProtocolConfig:
        return ProtocolConfig(
            lrs=tuple(self.lrs),
            epochs=self.epochs,
            batch_size=64,
            weight_decay=1e-4,
            channels_last=True,
            method_options={"auto_snr": dict(self.auto_snr)},
        )

    def shifts(self) -> tuple[Shift, ...]:
        if self.noise_scales is None:
            raise RuntimeError("noise scales not calibrated yet (run() does it)")
        return SHIFTS + noise_shifts(self.noise_scales)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d


def quick_config(out_dir: str = "results/offline/quick") -> OfflineConfig:
    """One seed, tiny sets, short training: checks the pipeline end to end (not the science)."""
    return OfflineConfig(
        out_dir=out_dir,
        seeds=(0,),
        per_class=5,
        val_per_class=2,
        test_per_class=4,
        lrs=(1e-3,),
        epochs=2,
        workers=2,
        pretrain=PretrainConfig(n_train=1000, n_val=200, epochs=1, batch_size=100),
        two_layer=TwoLayerConfig(ns=(6,), steps=20, seeds=(0, 1), n_eval=200),
        quick=True,
    )


@dataclass(frozen=True)
class Task:
    shift: Shift
    seed: int
    method: str


# ------------------------------------------------------------------------------------ worker side
_STATE: dict[str, Any] = {}


def _init_worker(source_path: str, pretrain_cfg: dict[str, Any], threads: int = 1) -> None:
    torch.set_num_threads(threads)
    cfg = dict(pretrain_cfg)
    cfg["widths"] = tuple(cfg["widths"])
    cfg["styles"] = tuple(cfg["styles"])
    _STATE["source_path"] = source_path
    _STATE["pretrain"] = PretrainConfig(**cfg)
    _STATE["models"] = OrderedDict()
    _STATE["data"] = OrderedDict()
    _STATE["prefix"] = OrderedDict()


def _lru(store: OrderedDict, key: Any, make, size: int):
    if key in store:
        store.move_to_end(key)
        return store[key]
    value = make()
    store[key] = value
    while len(store) > size:
        store.popitem(last=False)
    return value


def _model_for(shift: Shift, seed: int) -> torch.nn.Module:
    def make():
        if "source" not in _STATE:
            _STATE["source"] = load_source(Path(_STATE["source_path"]), _STATE["pretrain"])
        model = _STATE["source"]
        if shift.noise_block is not None:
            model = perturb_block(copy.deepcopy(model), shift.noise_block, shift.noise_scale, seed)
        return model

    key = (shift.noise_block, shift.noise_scale, seed) if shift.noise_block else ("source",)
    return _lru(_STATE["models"], key, make, 4)


def _run_task(task: Task, cfg: OfflineConfig, out_path: str) -> dict[str, Any]:
    started = time.perf_counter()
    cpu0 = time.process_time()
    splits = _lru(
        _STATE["data"],
        (task.shift.name, task.seed),
        lambda: target_splits(
            task.shift,
            task.seed,
            per_class=cfg.per_class,
            val_per_class=cfg.val_per_class,
            test_per_class=cfg.test_per_class,
            cue_agree=cfg.pretrain.cue_agree,
            absent=cfg.pretrain.absent,
        ),
        3,
    )
    cache = _lru(_STATE["prefix"], (task.shift.name, task.seed), PrefixCache, 2)
    model = _model_for(task.shift, task.seed)
    result = finetune(
        model,
        task.method,
        splits["train"],
        splits["val"],
        splits["test"],
        config=cfg.protocol(),
        seed=task.seed,
        prefix_cache=cache,
        data_key=f"{task.shift.name}/{task.seed}",
    )
    out = result.to_dict()
    out.update(
        {
            "shift": task.shift.name,
            "kind": task.shift.kind,
            "wall_s": time.perf_counter() - started,
            "cpu_s": time.process_time() - cpu0,
        }
    )
    atomic_write_text(Path(out_path), json.dumps(out, indent=1))
    return out


def _run_theory(cfg: TwoLayerConfig, out_path: str) -> dict[str, Any]:
    started = time.perf_counter()
    out = run_two_layer(cfg)
    out["wall_s"] = time.perf_counter() - started
    atomic_write_text(Path(out_path), json.dumps(out, indent=1))
    return out


# ------------------------------------------------------------------------------------ main side
def _task_path(cfg: OfflineConfig, source_key: str, task: Task) -> Path:
    key = config_hash(
        {
            "v": RUN_VERSION,
            "source": source_key,
            "shift": task.shift.to_dict(),
            "seed": task.seed,
            "method": task.method,
            "protocol": cfg.protocol().to_dict(),
            "sizes": [cfg.per_class, cfg.val_per_class, cfg.test_per_class],
        }
    )
    return Path(cfg.out_dir) / "cache" / "runs" / task.shift.name / str(task.seed) / f"{task.method}-{key}.json"


def _theory_path(cfg: OfflineConfig) -> Path:
    return Path(cfg.out_dir) / "cache" / f"two_layer-{config_hash(cfg.two_layer.to_dict())}.json"


def run(cfg: OfflineConfig, *, progress: bool = True, log=print) -> dict[str, Any]:
    """Pre-train (or load) the source model, run all missing runs, return the raw results."""
    started = time.perf_counter()
    cache_dir = Path(cfg.out_dir) / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One thread, whatever the machine: float reductions depend on the thread count, so two threads
    # pre-train a different source model (98.05 % instead of the published 98.2 %) and calibrate
    # other noise strengths. The fine-tuning workers run one thread each too.
    torch.set_num_threads(1)
    source_path, source_info = _source_model(cfg, cache_dir, progress, log)
    cfg, calibration = _calibrate(cfg, cache_dir, source_path, log)
    tasks = [Task(shift, seed, method) for shift in cfg.shifts() for seed in cfg.seeds for method in cfg.methods]
    results, todo = _cached_runs(cfg, source_path.stem, tasks)
    theory_path = _theory_path(cfg)
    theory = read_json(theory_path) if theory_path.exists() else None
    log(f"{len(tasks)} runs: {len(results)} cached, {len(todo)} to do" + ("" if theory is None else "; two-layer check cached"))
    theory = _execute(cfg, todo, results, theory, theory_path, str(source_path), progress)
    wall = time.perf_counter() - started
    # everything (pre-training included) computed by this invocation: remember how long it took
    from_scratch_now = len(todo) == len(tasks) and not source_info.get("cached") and bool(todo)
    return {
        "config": cfg,
        "source": {"path": str(source_path), **source_info},
        "results": results,
        "two_layer": theory,
        "noise_calibration": calibration,
        "wall_s": wall,
        "from_scratch": _from_scratch_timing(cfg, cache_dir, wall, len(tasks), from_scratch_now),
        "runs_cached": len(tasks) - len(todo),
        "runs_total": len(tasks),
    }


def _source_model(cfg: OfflineConfig, cache_dir: Path, progress: bool, log) -> tuple[Path, dict[str, Any]]:
    """The cached source checkpoint (pre-trained first when missing, with a progress bar) and its info."""
    from tqdm.auto import tqdm

    bar = None

    def pre_progress(step: int, total: int, loss: float) -> None:
        nonlocal bar
        if not progress:
            return
        if bar is None:
            bar = tqdm(total=total, desc="pre-training source model", unit="step")
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    source_path, source_info = load_or_pretrain(cfg.pretrain, cache_dir, pre_progress)
    if bar is not None:
        bar.close()
    log(
        f"source model: {source_path} (source val accuracy {source_info['source_val_acc']:.4f}, "
        f"{'cached' if source_info.get('cached') else 'pre-trained in %.0f s' % source_info['seconds']})"
    )
    return source_path, source_info


def _calibrate(cfg: OfflineConfig, cache_dir: Path, source_path: Path, log) -> tuple[OfflineConfig, Any]:
    """``cfg`` with the block-noise scales (calibrated once per source model, cached) and the calibration."""
    if cfg.noise_scales is not None:
        return cfg, None
    cal_path = cache_dir / f"noise-calibration-{source_path.stem}.json"
    calibration = read_json(cal_path) if cal_path.exists() else None
    if calibration is None:
        calibration = calibrate_noise(
            load_source(source_path, cfg.pretrain), absent=cfg.pretrain.absent, cue_agree=cfg.pretrain.cue_agree
        )
        atomic_write_text(cal_path, json.dumps(calibration, indent=1))
    log("block-noise scales (x weight std): " + ", ".join(f"{b} {v['scale']:g}" for b, v in calibration.items()))
    return replace(cfg, noise_scales={b: v["scale"] for b, v in calibration.items()}), calibration


def _cached_runs(cfg: OfflineConfig, source_key: str,
                 tasks: list[Task]) -> tuple[dict[Task, dict[str, Any]], list[tuple[Task, Path]]]:
    """The finished runs, and the others with their result paths in the order to run them: by (shift, seed)
    group (data and prefix activations are reused inside a worker), the most expensive methods first."""
    results: dict[Task, dict[str, Any]] = {}
    todo: list[tuple[Task, Path]] = []
    for task in tasks:
        path = _task_path(cfg, source_key, task)
        cached = read_json(path) if path.exists() else None
        if cached is not None:
            results[task] = cached
        else:
            todo.append((task, path))
    todo.sort(key=lambda tp: (tasks.index(Task(tp[0].shift, tp[0].seed, cfg.methods[0])), -_COST.get(tp[0].method, 1.0)))
    return results, todo


def _execute(cfg: OfflineConfig, todo: list[tuple[Task, Path]], results: dict[Task, dict[str, Any]],
             theory: dict[str, Any] | None, theory_path: Path, source_path: str, progress: bool) -> dict[str, Any]:
    """Run ``todo`` (into ``results``) and the two-layer check unless cached, in this process or in
    ``cfg.workers`` worker processes; the two-layer result."""
    from tqdm.auto import tqdm

    pbar = tqdm(total=len(todo) + (theory is None), desc="fine-tuning runs", unit="run", disable=not progress)
    init_args = (source_path, cfg.pretrain.to_dict())
    try:
        if cfg.workers <= 1:
            _init_worker(*init_args, threads=1)
            theory = _execute_here(cfg, todo, results, theory, theory_path, pbar)
        elif todo or theory is None:
            theory = _execute_in_pool(cfg, todo, results, theory, theory_path, pbar, init_args)
    finally:
        pbar.close()
    assert theory is not None
    return theory


def _execute_here(cfg, todo, results, theory, theory_path: Path, pbar) -> dict[str, Any]:
    if theory is None:
        theory = _run_theory(cfg.two_layer, str(theory_path))
        pbar.update(1)
    for task, path in todo:
        results[task] = _run_task(task, cfg, str(path))
        pbar.set_postfix_str(f"{task.shift.name}/{task.seed}/{task.method}")
        pbar.update(1)
    return theory


def _execute_in_pool(cfg, todo, results, theory, theory_path: Path, pbar, init_args) -> dict[str, Any]:
    pool = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=get_context("spawn"), initializer=_init_worker,
                               initargs=init_args)
    try:
        futures: dict[Any, Task | None] = {}
        if theory is None:
            futures[pool.submit(_run_theory, cfg.two_layer, str(theory_path))] = None
        for task, path in todo:
            futures[pool.submit(_run_task, task, cfg, str(path))] = task
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            theory = _collect(done, futures, results, pbar) or theory
    except BaseException:
        # Ctrl-C or a failed run: drop the queued runs at once (finished ones are already on disk)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return theory


def _collect(done, futures, results, pbar) -> dict[str, Any] | None:
    """Record finished futures; the two-layer result if it is among them."""
    theory = None
    for fut in done:
        task, value = futures[fut], fut.result()
        if task is None:
            theory = value
        else:
            results[task] = value
            pbar.set_postfix_str(f"{task.shift.name}/{task.seed}/{task.method}")
        pbar.update(1)
    return theory


def _from_scratch_timing(cfg: OfflineConfig, cache_dir: Path, wall: float, runs: int, now: bool) -> Any:
    """How long the whole experiment took when it last ran from scratch (recorded when ``now``)."""
    timing_path = cache_dir / "from_scratch_timing.json"
    if now:
        atomic_write_text(
            timing_path,
            json.dumps({"wall_s": wall, "runs": runs, "workers": cfg.workers, "cpu_count": os.cpu_count(),
                        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}),
        )
    return read_json(timing_path) if timing_path.exists() else None
