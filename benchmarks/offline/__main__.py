"""``python -m benchmarks.offline [--quick]``: the offline reproduction of surgical fine-tuning."""

from __future__ import annotations

import os

# On a shared or busy machine, OpenMP threads that spin while waiting make multi-threaded training
# ~10x slower (measured: 1.5 s/step instead of 0.07 s with 2 threads on 2 busy cores). Must be set
# before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402

from .ablation import ABLATIONS, ablation_config, ablation_row, write_ablation  # noqa: E402
from .report import summarise, write_outputs  # noqa: E402
from .runner import OfflineConfig, quick_config, run  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.offline", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one seed, tiny sets, short training (CI smoke test)")
    parser.add_argument("--out", default=None, help="output directory (default results/offline, quick: results/offline/quick)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds (default 0 1 2); each seed pre-trains its own source model")
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows (shift names; default all)")
    parser.add_argument("--ablation", choices=sorted(ABLATIONS), default=None,
                        help="run one Auto-RGN ablation (and full fine-tuning) on every row; prints the ablation table")
    parser.add_argument("--stream", action="store_true",
                        help="also run the unlabeled-stream (test-time adaptation) experiment: about 4 more minutes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    cfg = quick_config() if args.quick else OfflineConfig()
    if args.out is not None:
        cfg = replace(cfg, out_dir=args.out)
    if args.workers is not None:
        if args.workers < 1:
            parser.error(f"--workers must be at least 1, got {args.workers}")
        cfg = replace(cfg, workers=args.workers)
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    if args.rows is not None:
        cfg = replace(cfg, rows=tuple(args.rows))
    if args.ablation is not None:
        cfg = ablation_config(cfg, args.ablation)
    try:
        cfg.check_rows()
    except ValueError as exc:
        parser.error(f"--rows: {exc}")
    raw = run(cfg, progress=not args.no_progress)
    if args.ablation is not None:  # the main table and figures stay the main job's
        summary = summarise(raw)
        print(write_ablation(cfg.out_dir, ablation_row(args.ablation, summary)))
        print(f"wrote {cfg.out_dir}/ablations/table.md; wall time {summary['wall_time_s']:.0f} s")
        return 0
    summary = write_outputs(raw)
    print(open(f"{cfg.out_dir}/table.md").read())
    print(f"wrote {cfg.out_dir}/table.md, summary.json and figures; wall time {summary['wall_time_s']:.0f} s")
    if args.stream:
        from .stream_runner import run_streams, write_stream_outputs

        streams = run_streams(cfg, raw["sources"])
        print(write_stream_outputs(cfg.out_dir, streams))
        print(f"wrote {cfg.out_dir}/stream.md, stream.json and stream_curves.png; wall time {streams['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
