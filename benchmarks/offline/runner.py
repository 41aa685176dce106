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
from concurrent.futures import FIRST_COMPLETED, Executor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..protocol import PrefixCache, ProtocolConfig, finetune
from ..runs import atomic_write_text, config_hash, read_json, worker_pool
from .pretrain import PretrainConfig, load_or_pretrain, load_source, source_path
from .shifts import BLOCK_NOISE_BLOCKS, SHIFTS, Shift, calibrate_noise, noise_shifts, perturb_block, target_splits
from .theory import TwoLayerConfig, run_two_layer

__all__ = ["METHODS", "OfflineConfig", "quick_config", "run", "Task"]

#: columns of the table, in order
METHODS: tuple[str, ...] = (
    "none", "all", "stem", "layer1", "layer2", "layer3", "layer4", "fc", "auto_rgn", "auto_rgn_paper", "auto_snr",
)
BLOCKS: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")
#: rough relative cost of one run (full fine-tuning = 1), to order the work
_COST = {"none": 0.02, "fc": 0.08, "layer4": 0.3, "layer3": 0.4, "layer2": 0.55, "layer1": 0.8}

RUN_VERSION = 3  # bump when the protocol changes in a way the hash does not see


@dataclass
class OfflineConfig:
    out_dir: str = "results/offline"
    #: seed s pre-trains its own source model (``pretrain.seed + s``), draws its own target splits and
    #: fixes the batch order: the spread over seeds includes the source model's
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    per_class: int = 25
    val_per_class: int = 10
    test_per_class: int = 100
    lrs: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
    #: 8 steps per epoch on 250 images; up to 240 steps, as the official code's runs take
    batch_size: int = 32
    epochs: int = 30
    #: an lr's run stops after this many epochs without a better validation accuracy (None: never)
    patience: int | None = 5
    workers: int = 2
    #: per seed, per-block noise scales of the block-noise experiment; None: calibrated per source model
    noise_scales: dict[int, dict[str, float]] | None = None
    #: the rows to run (shift names); None: every row
    rows: tuple[str, ...] | None = None
    #: per-method options, e.g. ``{"auto_rgn": {"quantile": 0.9}}`` (the ablations)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    auto_snr: dict[str, Any] = field(default_factory=lambda: {"threshold": 0.5, "samples": 5})
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    two_layer: TwoLayerConfig = field(default_factory=TwoLayerConfig)
    quick: bool = False

    def protocol(self) -> ProtocolConfig:
        options = {"auto_snr": dict(self.auto_snr)}
        options.update({k: dict(v) for k, v in self.method_options.items()})
        extra = {} if self.patience is None else {"patience": self.patience}
        return ProtocolConfig(
            lrs=tuple(self.lrs),
            epochs=self.epochs,
            batch_size=self.batch_size,
            weight_decay=1e-4,
            channels_last=True,
            method_options=options,
            **extra,
        )

    def source_config(self, seed: int) -> PretrainConfig:
        """The pre-training recipe of seed ``seed``'s source model."""
        return replace(self.pretrain, seed=self.pretrain.seed + seed)

    def shifts(self, seed: int) -> tuple[Shift, ...]:
        """Every row's shift for seed ``seed`` (block-noise scales come from that seed's source model)."""
        if self.noise_scales is None:
            raise RuntimeError("noise scales not calibrated yet (run() does it)")
        every = SHIFTS + noise_shifts(self.noise_scales[seed])
        return every if self.rows is None else tuple(s for s in every if s.name in self.rows)

    def check_rows(self) -> None:
        """ValueError naming every row when ``rows`` names one that does not exist."""
        names = [s.name for s in SHIFTS] + [f"noise_{b}" for b in BLOCK_NOISE_BLOCKS]
        unknown = sorted(set(self.rows or ()) - set(names))
        if unknown:
            raise ValueError(f"unknown row(s) {', '.join(unknown)}; the rows are {', '.join(names)}")

    def row_names(self) -> list[str]:
        return [s.name for s in self.shifts(self.seeds[0])]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        patience=None,
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


def _init_worker(source_paths: dict[int, str], threads: int = 1) -> None:
    torch.set_num_threads(threads)
    _STATE["source_paths"] = dict(source_paths)
    _STATE["sources"] = {}
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


def _source_for(seed: int, cfg: OfflineConfig) -> torch.nn.Module:
    if seed not in _STATE["sources"]:
        _STATE["sources"][seed] = load_source(Path(_STATE["source_paths"][seed]), cfg.source_config(seed))
    return _STATE["sources"][seed]


def _model_for(shift: Shift, seed: int, cfg: OfflineConfig) -> torch.nn.Module:
    def make():
        model = _source_for(seed, cfg)
        if shift.noise_block is not None:
            model = perturb_block(copy.deepcopy(model), shift.noise_block, shift.noise_scale, seed)
        return model

    key = (shift.noise_block, shift.noise_scale, seed)
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
    model = _model_for(task.shift, task.seed, cfg)
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
def _task_path(cfg: OfflineConfig, source_keys: dict[int, str], task: Task) -> Path:
    key = config_hash(
        {
            "v": RUN_VERSION,
            "source": source_keys[task.seed],
            "shift": task.shift.to_dict(),
            "seed": task.seed,
            "method": task.method,
            "protocol": _protocol_key(cfg, task.method),
            "sizes": [cfg.per_class, cfg.val_per_class, cfg.test_per_class],
        }
    )
    return Path(cfg.out_dir) / "cache" / "runs" / task.shift.name / str(task.seed) / f"{task.method}-{key}.json"


def _protocol_key(cfg: OfflineConfig, method: str) -> dict[str, Any]:
    """The protocol settings a run of ``method`` depends on: only its own method options, so that an
    ablation of one method's options reuses every other method's runs."""
    d = cfg.protocol().to_dict()
    d["method_options"] = {k: v for k, v in d["method_options"].items() if k == method}
    return d


def _theory_path(cfg: OfflineConfig) -> Path:
    return Path(cfg.out_dir) / "cache" / f"two_layer-{config_hash(cfg.two_layer.to_dict())}.json"


def run(cfg: OfflineConfig, *, progress: bool = True, log=print) -> dict[str, Any]:
    """Pre-train (or load) one source model per seed, run all missing runs, return the raw results.

    One pool does both: a seed's runs are queued as soon as its source model (and noise calibration) is
    ready, so they run beside the source models still pre-training instead of after all of them."""
    started = time.perf_counter()
    cache_dir = Path(cfg.out_dir) / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One thread, whatever the machine: float reductions depend on the thread count, so two threads
    # pre-train a different source model and calibrate other noise strengths. The fine-tuning workers
    # run one thread each too.
    cfg.check_rows()
    torch.set_num_threads(1)
    theory_path = _theory_path(cfg)
    theory = read_json(theory_path) if theory_path.exists() else None
    paths = {s: str(source_path(cfg.source_config(s), cache_dir)) for s in cfg.seeds}
    schedule = _Schedule(cfg, cache_dir, log)
    schedule.run(worker_pool(cfg.workers, _init_worker, (paths,)), theory, theory_path, progress)
    sources, results = schedule.sources, schedule.results
    cfg = _with_noise_scales(cfg, sources)
    wall = time.perf_counter() - started
    # everything (pre-training included) computed by this invocation: remember how long it took
    fresh_sources = not any(src["cached"] for src in sources.values())
    from_scratch_now = schedule.todo == schedule.total and fresh_sources and schedule.todo > 0
    return {
        "config": cfg,
        "sources": sources,
        "results": results,
        "two_layer": schedule.theory,
        "wall_s": wall,
        "from_scratch": _from_scratch_timing(cfg, cache_dir, wall, schedule.total, from_scratch_now),
        "runs_cached": schedule.total - schedule.todo,
        "runs_total": schedule.total,
    }


def _prepare_source(cfg: PretrainConfig, cache_dir: str) -> dict[str, Any]:
    """Pre-train (or load) one source model and calibrate its block-noise scales (cached next to it)."""
    torch.set_num_threads(1)
    path, info = load_or_pretrain(cfg, Path(cache_dir))
    cal_path = Path(cache_dir) / f"noise-calibration-{path.stem}.json"
    calibration = read_json(cal_path) if cal_path.exists() else None
    if calibration is None:
        calibration = calibrate_noise(load_source(path, cfg), absent=cfg.absent, cue_agree=cfg.cue_agree)
        atomic_write_text(cal_path, json.dumps(calibration, indent=1))
    return {"path": str(path), "cached": bool(info.get("cached")), "source_val_acc": info["source_val_acc"],
            "seconds": info.get("seconds"), "seed": cfg.seed, "calibration": calibration}


def _with_noise_scales(cfg: OfflineConfig, sources: dict[int, dict[str, Any]]) -> OfflineConfig:
    """``cfg`` with the block-noise scales of its source models (unless it fixes them itself)."""
    if cfg.noise_scales is not None:
        return cfg
    scales = {s: {b: v["scale"] for b, v in src["calibration"].items()} for s, src in sources.items()}
    return replace(cfg, noise_scales=scales)


def _log_source(seed: int, src: dict[str, Any], log) -> None:
    scales = ", ".join(f"{b} {v['scale']:g}" for b, v in src["calibration"].items())
    how = "cached" if src["cached"] else f"pre-trained in {src['seconds']:.0f} s"
    log(f"seed {seed}: source model {Path(src['path']).name} ({how}), source val accuracy "
        f"{src['source_val_acc']:.4f}; block-noise scales (x weight std): {scales}")


class _Schedule:
    """The jobs of one invocation: every seed's source model, then that seed's runs not in the cache (most
    expensive first within each (shift, seed) group, whose data and prefix activations a worker reuses),
    and the two-layer check unless cached; in this process (``workers <= 1``) or in a process pool."""

    def __init__(self, cfg: OfflineConfig, cache_dir: Path, log) -> None:
        self.cfg, self.cache_dir, self.log = cfg, cache_dir, log
        self.sources: dict[int, dict[str, Any]] = {}
        self.results: dict[Task, dict[str, Any]] = {}
        self.theory: dict[str, Any] | None = None
        self.total = self.todo = 0

    def run(self, pool: Executor, theory: dict[str, Any] | None, theory_path: Path, progress: bool) -> None:
        """Every job through ``pool`` (shut down at the end); ``theory``: the cached two-layer result, if any."""
        from tqdm.auto import tqdm

        self.theory = theory
        pbar = tqdm(total=len(self.cfg.seeds) + (theory is None), desc="offline jobs", unit="job",
                    disable=not progress)
        try:
            jobs = {pool.submit(_prepare_source, self.cfg.source_config(s), str(self.cache_dir)): ("source", s)
                    for s in self.cfg.seeds}
            if theory is None:
                jobs[pool.submit(_run_theory, self.cfg.two_layer, str(theory_path))] = ("theory", None)
            pending = set(jobs)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    kind, key = jobs.pop(fut)
                    pending |= self._finished(kind, key, fut.result(), pool, jobs, pbar)
                    pbar.update(1)
        except BaseException:
            # Ctrl-C or a failed job: drop the queued jobs at once (finished runs are already on disk)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            pbar.close()
        pool.shutdown(wait=True)
        self.log(f"{self.total} runs: {self.total - self.todo} cached, {self.todo} run now")

    def _finished(self, kind: str, key: Any, value: Any, pool, jobs: dict, pbar) -> set:
        """Record a finished job; the jobs it makes ready (a source model's runs), submitted."""
        if kind == "theory":
            self.theory = value
            return set()
        if kind == "run":
            self.results[key] = value
            pbar.set_postfix_str(f"{key.shift.name}/{key.seed}/{key.method}")
            return set()
        self.sources[key] = value
        _log_source(key, value, self.log)
        cfg = _with_noise_scales(self.cfg, {key: value})
        tasks = [Task(shift, key, method) for shift in cfg.shifts(key) for method in cfg.methods]
        cached, todo = _cached_runs(cfg, {key: Path(value["path"]).stem}, tasks)
        self.results.update(cached)
        self.total, self.todo = self.total + len(tasks), self.todo + len(todo)
        pbar.total += len(todo)
        pbar.refresh()
        new = {pool.submit(_run_task, task, cfg, str(path)): ("run", task) for task, path in todo}
        jobs.update(new)
        return set(new)


def _cached_runs(cfg: OfflineConfig, source_keys: dict[int, str],
                 tasks: list[Task]) -> tuple[dict[Task, dict[str, Any]], list[tuple[Task, Path]]]:
    """The finished runs, and the others with their result paths in the order to run them: by (shift, seed)
    group (data and prefix activations are reused inside a worker), the most expensive methods first."""
    results: dict[Task, dict[str, Any]] = {}
    todo: list[tuple[Task, Path]] = []
    for task in tasks:
        path = _task_path(cfg, source_keys, task)
        cached = read_json(path) if path.exists() else None
        if cached is not None:
            results[task] = cached
        else:
            todo.append((task, path))
    group = {key: i for i, key in enumerate(dict.fromkeys((t.shift.name, t.seed) for t in tasks))}
    todo.sort(key=lambda tp: (group[tp[0].shift.name, tp[0].seed], -_COST.get(tp[0].method, 1.0)))
    return results, todo


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
