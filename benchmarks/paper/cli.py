"""The paper's seven-dataset benchmark: pre-train or load a source model, then sweep (method, lr, seed).

Usage (details in benchmarks/README.md)::

    python -m benchmarks.paper --dataset cifar10c --data-root /data/CIFAR-10-C \\
        --source-checkpoint /ckpt/Standard.pt --arch wrn28_10 --corruptions all --out runs/cifar10c
    python -m benchmarks.paper --dataset living17 --data-root /data/imagenet --out runs/living17 --shard 0/4
    python -m benchmarks.paper --report --out runs/cifar10c          # table + plot from the JSON lines only

Every (method, lr, seed) is one run; each finished run is appended atomically to this shard's JSON-lines file
(``benchmarks.runs.ResultStore``); a re-run skips finished runs; ``--shard I/N`` keeps the runs whose index in the
(deterministic) run list is I modulo N. Under ``torchrun --nproc_per_node K -m benchmarks.paper ...`` every
run trains data-parallel on K processes (DDP, see ``benchmarks.protocol``) and rank 0 alone writes the results.
Fine-tuning itself is ``benchmarks.protocol`` (the shared loop: Adam, weight decay 1e-4, batch 64, BatchNorm in
eval mode, per-epoch target validation/test evaluation); methods are built from ``surgical_optim``
(``select_blocks`` / ``param_groups_by_block``, ``AutoRGN``, ``AutoSNR``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..datasets import (
    CORRUPTIONS,
    DatasetLayoutError,
    load_breeds,
    load_celeba,
    load_cifar10c,
    load_cifar_flip,
    load_imagenet_c,
    load_waterbirds,
)
from ..datasets.cifar10c import ALL_CORRUPTIONS
from ..protocol import PAPER_LRS
from .config import (
    DEFAULT_METHODS,
    FAMILIES,
    FAMILY_DEFAULTS,
    DataConfig,
    FinetuneConfig,
    HarnessConfig,
    SourceConfig,
    UsageError,
)
from .models import ARCHS
from .results import write_report

__all__ = ["main", "build_parser", "harness_config", "PROG"]

PROG = "python -m benchmarks.paper"
_DESCRIPTION = "The paper's seven-dataset benchmark: pre-train or load a source model, then sweep (method, lr, seed)."


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(t) for t in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects I/N, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage block), like every other CLI error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog=PROG, description=_DESCRIPTION,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=FAMILIES, help="benchmark family")
    p.add_argument("--data-root", help="the dataset's root folder in its native layout (see README)")
    p.add_argument("--out", default="paper_runs", help="output folder: results/*.jsonl, table.md, plot, models")
    p.add_argument("--report", action="store_true", help="only regenerate the table and plot from --out")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma list: none, all (full fine-tuning), block:<name>, block:* (every block of the paper's "
                        "split), first, last, linear_probe (= last), auto_rgn, auto_snr, gradual_first_last, "
                        "gradual_last_first, l1_sp, auto_rgn_paper (Auto-RGN as the official code runs it), "
                        "auto_select (per seed, the best of all and every block by validation accuracy: runs those, "
                        "nothing more)")
    p.add_argument("--lrs", default=",".join(str(x) for x in PAPER_LRS), help="learning-rate grid")
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default per dataset)")
    p.add_argument("--patience", type=int, help="stop a run after this many epochs in a row without a higher "
                                                "validation accuracy (default: run every epoch)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--max-tensor-gib", type=float, default=3.0,
                   help="target sets up to this size are held as tensors (enables the protocol's frozen-prefix "
                        "precomputation); larger ones are streamed with DataLoaders")
    p.add_argument("--l1sp-weight", type=float, default=1e-4, help="L1-SP: weight of ||theta - theta_source||_1")
    p.add_argument("--snr-threshold", type=float, default=0.5, help="Auto-SNR freezing threshold")
    p.add_argument("--corruptions", default=",".join(CORRUPTIONS),
                   help="CIFAR-10-C / ImageNet-C corruptions (comma list, or 'all' for the 15, 'extra' for all 19)")
    p.add_argument("--severity", type=int, default=5, choices=(1, 2, 3, 4, 5))
    p.add_argument("--data-seed", type=int, default=0, help="seed of the target splits (fixed across run seeds)")
    p.add_argument("--arch", choices=ARCHS)
    p.add_argument("--width", type=int, default=1, help="resnet26 width factor")
    p.add_argument("--source-checkpoint", help="load the source model from this state dict (no pre-training)")
    p.add_argument("--imagenet-init", type=int, choices=(0, 1), help="initialise resnet50 from ImageNet weights "
                                                                     "(local torch cache) before source training")
    p.add_argument("--cifar10-root", help="CIFAR-10 python batches, to pre-train a CIFAR-10-C source model")
    p.add_argument("--breeds-info-dir", help="folder with the BREEDS hierarchy files (default <data-root>/breeds)")
    p.add_argument("--source-epochs", type=int)
    p.add_argument("--source-lr", type=float)
    p.add_argument("--source-batch-size", type=int, default=128)
    p.add_argument("--source-wd", type=float, default=5e-4)
    p.add_argument("--source-seed", type=int, default=0)
    p.add_argument("--source-cache", help="folder for pre-trained source models (default <out>/source_models)")
    p.add_argument("--pretrain-only", action="store_true", help="train/cache the source model and stop "
                                                                "(run before a sharded sweep)")
    p.add_argument("--loader-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for the dataset loader, e.g. target_train_per_class=10 (JSON values)")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), help="I/N: run every N-th run starting at I")
    p.add_argument("--max-runs", type=int, help="stop after this many new runs (for smoke tests)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line. Every error is one line on stderr and a non-zero exit (``--debug``: the traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into one line
        if args.debug:
            raise
        if isinstance(e, DatasetLayoutError):
            line, code = e.summary, 1
        elif isinstance(e, UsageError):
            line, code = " ".join(str(e).split()), 2
        else:
            line, code = f"{type(e).__name__}: {' '.join(str(e).split())} (--debug shows the traceback)", 1
        print(f"{PROG}: error: {line}", file=sys.stderr)
        return code


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.report:
        if not (out / "results").is_dir():
            raise UsageError(f"--report: no results under {out} (expected {out / 'results'}/*.jsonl)")
        if int(os.environ.get("RANK", "0")) == 0:
            write_report(out, args.quiet)
        return 0
    if not args.dataset or not args.data_root:
        raise UsageError("--dataset and --data-root are required (or --report)")
    from .sweep import run_harness

    return run_harness(harness_config(args))


def harness_config(args: argparse.Namespace) -> HarnessConfig:
    """The parsed command line as typed configs: per-dataset defaults filled in, list arguments parsed, every
    value checked (a bad one is a :class:`UsageError`)."""
    fam = FAMILY_DEFAULTS[args.dataset]
    given = {k: getattr(args, k) for k in ("arch", "epochs", "source_epochs", "source_lr", "imagenet_init")}
    chosen = {k: fam[k] if v is None else v for k, v in given.items()}
    for flag, value, least in (("--epochs", chosen["epochs"], 1), ("--batch-size", args.batch_size, 1),
                               ("--eval-batch-size", args.eval_batch_size, 1), ("--workers", args.workers, 0),
                               ("--source-epochs", chosen["source_epochs"], 0)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    out = Path(args.out)
    return HarnessConfig(data=_data_config(args), source=_source_config(args, chosen, out),
                         finetune=_finetune_config(args, chosen["epochs"]), out=out, shard=args.shard,
                         max_runs=args.max_runs, device=args.device, quiet=args.quiet)


def _data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(
        family=args.dataset, root=args.data_root, corruptions=tuple(_parse_corruptions(args.corruptions)),
        severity=args.severity, seed=args.data_seed, loader_kwargs=_parse_loader_args(args.loader_arg, args.dataset),
        cifar10_root=args.cifar10_root, breeds_info_dir=args.breeds_info_dir, workers=args.workers,
        max_tensor_bytes=int(args.max_tensor_gib * 2**30),
    )


def _source_config(args: argparse.Namespace, chosen: dict[str, Any], out: Path) -> SourceConfig:
    return SourceConfig(
        arch=chosen["arch"], width=args.width, imagenet_init=bool(chosen["imagenet_init"]),
        checkpoint=args.source_checkpoint, epochs=chosen["source_epochs"], lr=chosen["source_lr"],
        batch_size=args.source_batch_size, weight_decay=args.source_wd, seed=args.source_seed,
        cache=Path(args.source_cache or (out / "source_models")), pretrain_only=args.pretrain_only,
    )


def _finetune_config(args: argparse.Namespace, epochs: int) -> FinetuneConfig:
    lrs = _parse_list(args.lrs, float, "--lrs", "positive numbers")
    if any(not lr > 0 for lr in lrs):
        raise UsageError(f"--lrs expects positive numbers, got {lrs}")
    seeds = _parse_list(args.seeds, int, "--seeds", "integers")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods is empty")
    if args.patience is not None and args.patience < 1:
        raise UsageError(f"--patience must be at least 1, got {args.patience}")
    return FinetuneConfig(
        methods=tuple(methods), lrs=tuple(lrs), seeds=tuple(seeds), epochs=epochs, batch_size=args.batch_size,
        weight_decay=args.weight_decay, eval_batch_size=args.eval_batch_size, l1sp_weight=args.l1sp_weight,
        snr_threshold=args.snr_threshold, patience=args.patience,
    )


def _parse_list(text: str, kind: type, flag: str, what: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} expects a comma list of {what}, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag} is empty")
    return values


def _parse_corruptions(text: str) -> list[str]:
    if text == "all":
        return list(CORRUPTIONS)
    if text == "extra":
        return list(ALL_CORRUPTIONS)
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in ALL_CORRUPTIONS]
    if unknown or not names:
        raise UsageError(f"--corruptions: unknown {', '.join(unknown) or '(empty list)'}; known: "
                         f"{', '.join(ALL_CORRUPTIONS)} (or 'all', 'extra')")
    return names


#: the loader of each family: its keyword options are what --loader-arg may set
LOADERS = {"cifar10c": load_cifar10c, "imagenet_c": load_imagenet_c, "living17": load_breeds,
           "entity30": load_breeds, "cifar_flip": load_cifar_flip, "waterbirds": load_waterbirds,
           "celeba": load_celeba}
#: loader options the harness sets from its own flags (per family where they differ)
SET_BY_FLAGS = {"corruption": "--corruptions", "severity": "--severity", "seed": "--data-seed",
                "info_dir": "--breeds-info-dir", "cifar10_root": "--cifar10-root"}
NOT_FROM_COMMAND_LINE = ("root", "spec", "transform", "train_transform")


def _parse_loader_args(items: list[str], family: str) -> dict[str, Any]:
    """``--loader-arg KEY=VALUE`` items (JSON values, else strings), checked against the loader's options."""
    params = inspect.signature(LOADERS[family]).parameters
    flags = dict(SET_BY_FLAGS, **({"split_seed": "--data-seed"} if family == "cifar_flip" else {}))
    options = [k for k in params if k not in NOT_FROM_COMMAND_LINE and k not in flags]
    kw: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UsageError(f"--loader-arg expects KEY=VALUE, got {item!r}")
        if key in flags:
            raise UsageError(f"--loader-arg {key}: set it with {flags[key]}")
        if key not in options:
            raise UsageError(f"--loader-arg {key}: not an option of the {family} loader; options: {', '.join(options)}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        default = params[key].default
        wrong = (isinstance(default, int) and not isinstance(default, bool)
                 and (not isinstance(value, int) or isinstance(value, bool)))
        wrong |= isinstance(default, float) and not isinstance(value, (int, float))
        if wrong:
            raise UsageError(f"--loader-arg {key}: expects a number like its default {default!r}, got {text!r}")
        kw[key] = value
    return kw
