"""Run the unlabeled-stream experiment (``stream.py``) for every seed's source model, cached and in parallel.

One unit of work is a stream: a (shift, seed) pair, whose held-out runs choose the lr and whose scored
runs are then made at the chosen lrs, in one worker process (the stream's shared activations stay in
that worker). Each finished stream is written atomically to
``<out>/cache/stream/<shift>/<seed>-<hash>.json``, the hash covering the source model, the shift, the
seed and the stream settings; a re-run skips finished streams.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any

import torch

from ..runs import atomic_write_text, config_hash, read_json, worker_pool
from .pretrain import PretrainConfig, load_source
from .runner import OfflineConfig
from .shifts import Shift
from .stream import STREAM_SHIFTS, StreamConfig, run_stream_experiment
from .stream_report import plot_stream_curves, stream_table

__all__ = ["stream_config", "run_streams", "write_stream_outputs"]

STREAM_VERSION = 1  # bump when the stream protocol changes in a way the hash does not see


def stream_config(cfg: OfflineConfig) -> StreamConfig:
    """The stream settings of this offline configuration (the source's cue pairing; tiny in --quick)."""
    if cfg.quick:
        return StreamConfig(stream=100, held_out=100, batch=50, chunk=50, lrs=(1e-3,), copies=1,
                            cue_agree=cfg.pretrain.cue_agree, absent=cfg.pretrain.absent)
    return StreamConfig(cue_agree=cfg.pretrain.cue_agree, absent=cfg.pretrain.absent)


def _stream_path(cfg: OfflineConfig, scfg: StreamConfig, source_key: str, shift: Shift, seed: int) -> Path:
    key = config_hash({"v": STREAM_VERSION, "source": source_key, "shift": shift.to_dict(), "seed": seed,
                       "stream": scfg.to_dict()})
    return Path(cfg.out_dir) / "cache" / "stream" / shift.name / f"{seed}-{key}.json"


def _run_one_stream(source_path: str, pretrain: PretrainConfig, shift: Shift, seed: int, scfg: StreamConfig,
                    out_path: str) -> dict[str, Any]:
    """Worker: the held-out runs, the lr choice and the scored runs of one (shift, seed) stream."""
    torch.set_num_threads(1)
    started, cpu0 = time.perf_counter(), time.process_time()
    model = load_source(Path(source_path), pretrain)
    out = run_stream_experiment({seed: model}, [shift], [seed], scfg)
    out.update({"shift": shift.name, "seed": seed, "wall_s": time.perf_counter() - started,
                "cpu_s": time.process_time() - cpu0})
    atomic_write_text(Path(out_path), json.dumps(out, indent=1))
    return out


def run_streams(cfg: OfflineConfig, sources: dict[int, dict[str, Any]], *, log=print) -> dict[str, Any]:
    """Every stream of every seed (cached ones read back); the held-out and scored results and timing."""
    scfg = stream_config(cfg)
    started = time.perf_counter()
    jobs, done = [], []
    for shift in STREAM_SHIFTS:
        for seed in cfg.seeds:
            src = sources[seed]
            path = _stream_path(cfg, scfg, Path(src["path"]).stem, shift, seed)
            cached = read_json(path) if path.exists() else None
            if cached is not None:
                done.append(cached)
            else:
                jobs.append((src["path"], cfg.source_config(seed), shift, seed, scfg, str(path)))
    log(f"unlabeled streams: {len(done) + len(jobs)} ({len(done)} cached, {len(jobs)} to do)")
    with worker_pool(cfg.workers if jobs else 1) as pool:
        for future in as_completed([pool.submit(_run_one_stream, *job) for job in jobs]):
            done.append(future.result())
    order = {(s.name, seed): i for i, (s, seed) in enumerate((s, seed) for s in STREAM_SHIFTS for seed in cfg.seeds)}
    done.sort(key=lambda r: order[(r["shift"], r["seed"])])
    return {"config": scfg.to_dict(), "held_out": [r for d in done for r in d["held_out"]],
            "scored": [r for d in done for r in d["scored"]],
            "chosen_lr": [c for d in done for c in d["chosen_lr"]],
            "cpu_s": sum(d["cpu_s"] for d in done), "wall_s": time.perf_counter() - started,
            "streams_cached": len(order) - len(jobs), "streams": len(order)}


def write_stream_outputs(out_dir: str, streams: dict[str, Any]) -> str:
    """``stream.md`` (the tables), ``stream.json`` (every result) and ``stream_curves.png``; the markdown."""
    out = Path(out_dir)
    cfg = streams["config"]
    intro = (f"# Unlabeled stream: online accuracy (%)\n\nEach stream: {cfg['stream']} images in batches of "
             f"{cfg['batch']}, predicted before each batch's update; the lr of each (shift, seed, variant, loss) "
             f"chosen among {cfg['lrs']} on a separate {cfg['held_out']}-image held-out stream of the same shift. "
             f"MEMO with {cfg['copies']} augmented copies. Mean ± s.e. over seeds (one source model each). "
             f"Streams: {streams['streams']} ({streams['streams_cached']} cached); CPU time of the streams run "
             f"now or before: {streams['cpu_s']:.0f} CPU-s.\n")
    md = intro + "\n" + stream_table(streams["scored"])
    atomic_write_text(out / "stream.md", md)
    atomic_write_text(out / "stream.json", json.dumps(streams, indent=1))
    plot_stream_curves(streams["scored"], out / "stream_curves.png")
    return md
