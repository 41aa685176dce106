"""The paper's seven-dataset benchmark: pre-train or load a source model, then sweep (method, lr, seed).

Usage (details in benchmarks/README.md)::

    python -m benchmarks.paper --dataset cifar10c --data-root /data/CIFAR-10-C \\
        --source-checkpoint /ckpt/Standard.pt --arch wrn28_10 --corruptions all --out runs/cifar10c
    python -m benchmarks.paper --dataset living17 --data-root /data/imagenet --out runs/living17 --shard 0/4
    python -m benchmarks.paper --report --out runs/cifar10c          # table + plot from the JSON lines only

Every (method, lr, seed) is one run; each finished run is appended atomically to this shard's JSON-lines file
(see ``paper_results``); a re-run skips finished runs; ``--shard I/N`` keeps the runs whose index in the
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
import platform
import random
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from .datasets import (
    CORRUPTIONS,
    BenchmarkData,
    DatasetLayoutError,
    load_breeds,
    load_celeba,
    load_cifar10c,
    load_cifar_flip,
    load_dataset,
    load_imagenet_c,
    load_waterbirds,
)
from .datasets.cifar10c import ALL_CORRUPTIONS
from .paper_models import CheckpointMismatch, build_model, load_checkpoint, paper_block_matcher
from .protocol import PAPER_LRS, evaluate, method_names
from .paper_results import format_table, plot_relative, summarise
from .runs import ResultStore, atomic_torch_save, config_hash, read_results, train_supervised

__all__ = ["main", "build_parser", "enumerate_runs", "Run", "FAMILIES", "DEFAULT_METHODS", "UsageError"]

PROG = "python -m benchmarks.paper"

FAMILIES = ("cifar10c", "imagenet_c", "living17", "entity30", "cifar_flip", "waterbirds", "celeba")
#: methods run by default; "block:*" expands to one run per block of the model (the paper's split)
DEFAULT_METHODS = ("none", "all", "block:*", "auto_rgn", "auto_snr", "gradual_first_last", "gradual_last_first",
                   "l1_sp")

# Per-family defaults (every one overridable on the command line).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # epochs = fine-tuning epochs (official README: 15 for CIFAR-C, 10 for ImageNet-C)
    "cifar10c": {"arch": "resnet26", "epochs": 15, "source_epochs": 200, "source_lr": 0.1, "imagenet_init": False},
    "cifar_flip": {"arch": "resnet26", "epochs": 15, "source_epochs": 200, "source_lr": 0.1, "imagenet_init": False},
    "imagenet_c": {"arch": "resnet50", "epochs": 10, "source_epochs": 0, "source_lr": 0.0, "imagenet_init": True},
    # BREEDS: the source model must not have seen ImageNet (its target subclasses are ImageNet classes)
    "living17": {"arch": "resnet50", "epochs": 15, "source_epochs": 90, "source_lr": 0.1, "imagenet_init": False},
    "entity30": {"arch": "resnet50", "epochs": 15, "source_epochs": 90, "source_lr": 0.1, "imagenet_init": False},
    # spurious correlations: ImageNet-initialised ResNet-50 trained on the source (train) split, as in group DRO
    "waterbirds": {"arch": "resnet50", "epochs": 15, "source_epochs": 50, "source_lr": 1e-3, "imagenet_init": True},
    "celeba": {"arch": "resnet50", "epochs": 15, "source_epochs": 20, "source_lr": 1e-3, "imagenet_init": True},
}


# ---------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    dataset: str  # variant key, e.g. "cifar10c/fog/5"
    family: str
    method: str
    lr: float | None
    seed: int
    config_id: str

    @property
    def run_id(self) -> str:
        return config_hash([self.dataset, self.method, self.lr, self.seed, self.config_id], 20)


def enumerate_runs(
    variants: list[str],
    family: str,
    methods: list[str],
    lrs: list[float],
    seeds: list[int],
    config_id: str,
) -> list[Run]:
    """All runs in a fixed order (variant, method, lr, seed); "none" has a single lr (None) per seed."""
    runs = []
    for v in variants:
        for m in methods:
            for lr in ([None] if m == "none" else lrs):
                for s in seeds:
                    runs.append(Run(v, family, m, lr, s, config_id))
    return runs


def shard_runs(runs: list[Run], shard: tuple[int, int]) -> list[Run]:
    i, n = shard
    return [r for k, r in enumerate(runs) if k % n == i]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(t) for t in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects I/N, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


# ---------------------------------------------------------------------------------------------- data
def dataset_variants(args) -> list[str]:
    if args.dataset == "cifar10c":
        return [f"cifar10c/{c}/{args.severity}" for c in args.corruptions]
    if args.dataset == "imagenet_c":
        return [f"imagenet_c/{c}/{args.severity}" for c in args.corruptions]
    return [args.dataset]


def load_variant(args, variant: str, *, seed: int | None = None) -> BenchmarkData:
    """The data of one variant; ``args.data_seed`` fixes the target splits (the same for every run seed)."""
    kw: dict[str, Any] = dict(args.loader_kwargs)
    fam = variant.split("/")[0]
    if fam in ("cifar10c", "imagenet_c"):
        _, corruption, severity = variant.split("/")
        kw.update(corruption=corruption, severity=int(severity), seed=args.data_seed)
        if fam == "cifar10c" and args.cifar10_root:
            kw["cifar10_root"] = args.cifar10_root
    elif fam in ("living17", "entity30"):
        kw.update(seed=args.data_seed)
        if args.breeds_info_dir:
            kw["info_dir"] = args.breeds_info_dir
    elif fam == "cifar_flip":
        kw.update(split_seed=args.data_seed)
    else:
        kw.update(seed=args.data_seed)
    return load_dataset(fam, args.data_root, **kw)


def make_loader(ds, batch_size: int, shuffle: bool, workers: int, seed: int = 0) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=g,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


# ---------------------------------------------------------------------------------------------- source model
def _augment(x: torch.Tensor) -> torch.Tensor:
    """Batch-wise source-training augmentation on tensors: random horizontal flip, and for small (CIFAR-size)
    inputs a random crop with 4 pixels of zero padding."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if x.shape[-1] <= 64:
        n, _, h, w = x.shape
        padded = nn.functional.pad(x, (4, 4, 4, 4))
        dx, dy = torch.randint(0, 9, (2,)).tolist()  # one offset per batch keeps it vectorised
        x = padded[:, :, dy:dy + h, dx:dx + w]
    return x


def source_config(args, data: BenchmarkData) -> dict[str, Any]:
    return {
        "family": args.dataset,
        "arch": args.arch,
        "num_classes": data.num_classes,
        "imagenet_init": args.imagenet_init,
        "source_epochs": args.source_epochs,
        "source_lr": args.source_lr,
        "source_batch_size": args.source_batch_size,
        "source_wd": args.source_wd,
        "source_seed": args.source_seed,
        "data_seed": args.data_seed,
        "loader_kwargs": args.loader_kwargs,
        "n_source_train": len(data.source_train) if data.source_train is not None else None,
        "data_info": data.info.get("split", data.info.get("permutation")),
    }


def train_source(model: nn.Module, data: BenchmarkData, args, device: torch.device, desc: str) -> float:
    """Plain supervised source training (SGD, momentum 0.9, cosine schedule, batch-wise flip/crop); the
    source-validation accuracy (a fraction; nan without source-validation data)."""
    from tqdm.auto import tqdm

    torch.manual_seed(args.source_seed)
    loader = make_loader(data.source_train, args.source_batch_size, True, args.workers, args.source_seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.source_lr, momentum=0.9, weight_decay=args.source_wd,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, args.source_epochs * len(loader)))
    bar = tqdm(total=args.source_epochs, desc=desc, disable=args.quiet)

    def prepare(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _augment(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)

    def epoch_done(loss: torch.Tensor) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")

    train_supervised(model, lambda: loader, opt, sched, args.source_epochs, prepare=prepare, on_epoch=epoch_done)
    bar.close()
    if data.source_val is None or not len(data.source_val):
        return float("nan")
    val = make_loader(data.source_val, args.eval_batch_size, False, args.workers)
    return evaluate(model, val, batch_size=args.eval_batch_size, device=device).acc


def seed_everything(seed: int) -> None:
    """Seed every generator a run may draw from (Python, NumPy, torch on the CPU and every GPU), so that
    what happens next does not depend on what ran before in this process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_source_architecture(args, num_classes: int) -> nn.Module:
    """The source model's architecture, initialised from ``--source-seed`` (ImageNet weights where asked)."""
    seed_everything(args.source_seed)
    try:
        return build_model(args.arch, num_classes, imagenet_init=args.imagenet_init, width=args.width)
    except FileNotFoundError as e:  # ImageNet weights not in the local torch cache
        raise UsageError(str(e)) from e


def _load_source_checkpoint(model: nn.Module, args) -> None:
    path = args.source_checkpoint
    if not Path(path).is_file():
        raise UsageError(f"--source-checkpoint {path}: no such file")
    try:
        load_checkpoint(model, path)
    except CheckpointMismatch as e:
        raise UsageError(f"--source-checkpoint {path} does not fit --arch {args.arch}: {e}; pass the --arch "
                         "it was trained with") from e
    except Exception as e:  # noqa: BLE001 - whatever torch.load says, the file is not a state dict
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"--source-checkpoint {path}: not a readable PyTorch state dict "
                         f"({type(e).__name__}: {first})") from e


def get_source_model(args, data: BenchmarkData, device: torch.device) -> tuple[nn.Module, str]:
    """The source model and a hash identifying it (part of every run's config id). Built after seeding with
    ``--source-seed``, so the same config gives the same source model in every process."""
    model = build_source_architecture(args, data.num_classes)
    if args.source_checkpoint:
        _load_source_checkpoint(model, args)
        st = os.stat(args.source_checkpoint)
        return model.to(device), config_hash({"checkpoint": os.path.abspath(args.source_checkpoint), "size": st.st_size,
                                        "arch": args.arch}, 12)
    if args.dataset == "imagenet_c":
        if data.num_classes != 1000:
            raise UsageError(f"imagenet_c: found {data.num_classes} class folders; the torchvision ResNet-50 "
                             "source model needs all 1000 (class index = sorted wnid order), or pass "
                             "--source-checkpoint")
        if args.arch != "resnet50":
            raise UsageError("imagenet_c: the source model is torchvision's ResNet-50 (--arch resnet50) or "
                             "--source-checkpoint")
        return model.to(device), config_hash({"torchvision": "resnet50/IMAGENET1K_V1"}, 12)
    if data.source_train is None:
        raise UsageError(
            f"{args.dataset}: no source data to pre-train on; pass --source-checkpoint PATH "
            "(e.g. RobustBench's Standard WRN-28-10 with --arch wrn28_10) or --cifar10-root DIR"
        )
    cfg = source_config(args, data)
    h = config_hash(cfg, 12)
    path = Path(args.source_cache or (Path(args.out) / "source_models")) / f"{args.dataset}-{args.arch}-{h}.pt"
    lock = path.with_suffix(".lock")
    while True:
        if path.is_file():
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.to(device), h
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # one process trains; other shards wait for its file (a stale lock must be removed by hand)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
            os.close(fd)
            break
        except FileExistsError:
            if not args.quiet:
                print(f"waiting for {path} (being trained; lock {lock})", file=sys.stderr)
            time.sleep(30)
    try:
        model.to(device)
        val = train_source(model, data, args, device, desc=f"source {args.dataset}/{args.arch}")
        atomic_torch_save(model.state_dict(), path)
    finally:
        lock.unlink(missing_ok=True)
    meta = {"config": cfg, "source_val_acc": val, "finished_at": datetime.now(timezone.utc).isoformat()}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
    if not args.quiet:
        print(f"source model saved to {path} (source val acc {100 * val:.2f}%)", file=sys.stderr)
    return model, h


# ---------------------------------------------------------------------------------------------- fine-tuning
def finetune(run: Run, source: nn.Module, data: BenchmarkData, args, device: torch.device, *,
             prepared=None, prefix_cache=None, progress=None) -> dict[str, Any]:
    """One run through ``benchmarks.protocol.finetune`` (via ``paper_adapter``); the source model is not
    modified (the protocol trains a copy)."""
    from .paper_adapter import run_protocol

    return run_protocol(run, source, data, args, device, prepared=prepared, prefix_cache=prefix_cache,
                        progress=progress)


# ---------------------------------------------------------------------------------------------- CLI
class UsageError(Exception):
    """A bad command line or an unusable input file; ``main`` prints it as one line and exits with 2."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage block), like every other CLI error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=FAMILIES, help="benchmark family")
    p.add_argument("--data-root", help="the dataset's root folder in its native layout (see README)")
    p.add_argument("--out", default="paper_runs", help="output folder: results/*.jsonl, table.md, plot, models")
    p.add_argument("--report", action="store_true", help="only regenerate the table and plot from --out")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma list: none, all (full fine-tuning), block:<name>, block:* (every block of the paper's "
                        "split), first, last, linear_probe (= last), auto_rgn, auto_snr, gradual_first_last, "
                        "gradual_last_first, l1_sp")
    p.add_argument("--lrs", default=",".join(str(x) for x in PAPER_LRS), help="learning-rate grid")
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default per dataset)")
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
    p.add_argument("--arch", choices=("resnet26", "wrn28_10", "resnet50", "tiny_cnn"))
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


def _finish_args(args) -> None:
    """Fill the per-dataset defaults and parse the list arguments; a bad value is a :class:`UsageError`."""
    fam = FAMILY_DEFAULTS[args.dataset]
    for k in ("arch", "epochs", "source_epochs", "source_lr"):
        if getattr(args, k) is None:
            setattr(args, k, fam[k])
    if args.imagenet_init is None:
        args.imagenet_init = fam["imagenet_init"]
    args.imagenet_init = bool(args.imagenet_init)
    for flag, value, least in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                               ("--eval-batch-size", args.eval_batch_size, 1), ("--workers", args.workers, 0),
                               ("--source-epochs", args.source_epochs, 0)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    args.corruptions = _parse_corruptions(args.corruptions)
    args.lrs = _parse_list(args.lrs, float, "--lrs", "positive numbers")
    if any(not lr > 0 for lr in args.lrs):
        raise UsageError(f"--lrs expects positive numbers, got {args.lrs}")
    args.seeds = _parse_list(args.seeds, int, "--seeds", "integers")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods:
        raise UsageError("--methods is empty")
    args.loader_kwargs = _parse_loader_args(args.loader_arg, args.dataset)
    args.max_tensor_bytes = int(args.max_tensor_gib * 2**30)


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


def _check_methods(methods: list[str], blocks: list[str]) -> list[str]:
    """The runs ``--methods`` asks for (canonical names, ``block:*`` expanded over the paper's ``blocks``)."""
    try:
        return method_names(methods, blocks)
    except KeyError as e:
        raise UsageError(f"--methods {e.args[0]}") from None


def _skeleton_blocks(args, num_classes: int) -> list[str]:
    """The paper's blocks of ``--arch``, from a model built on the meta device (no memory, no random draws)."""
    with torch.device("meta"):
        skeleton = build_model(args.arch, num_classes, imagenet_init=False, width=args.width)
    return _paper_blocks(skeleton, args.arch)


def protocol_config(args, source_hash: str) -> dict[str, Any]:
    return {
        "source": source_hash,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
        "data_seed": args.data_seed,
        "loader_kwargs": args.loader_kwargs,
        "l1sp_weight": args.l1sp_weight,
        "snr_threshold": args.snr_threshold,
    }


def write_report(out: Path, quiet: bool = False) -> str:
    records = read_results(out / "results")
    summary = summarise(records)
    table = format_table(summary)
    (out / "table.md").write_text(table)
    plot = plot_relative(summary, out / "relative_to_full_ft.png")
    if not quiet:
        print(table)
        if plot:
            print(f"plot: {plot}", file=sys.stderr)
    return table


def _init_distributed(args) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group). Under torchrun (``WORLD_SIZE`` > 1)
    the process group is initialised from the environment: NCCL on CUDA (device ``cuda:LOCAL_RANK``), else
    gloo; ``args.device`` is updated."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    cuda = torch.device(args.device).type == "cuda" and torch.cuda.is_available()
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), created


def main(argv: list[str] | None = None) -> int:
    """The command line. Every error is one line on stderr and a non-zero exit (``--debug``: the traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
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


def _main(args) -> int:
    out = Path(args.out)
    if args.report:
        if not (out / "results").is_dir():
            raise UsageError(f"--report: no results under {out} (expected {out / 'results'}/*.jsonl)")
        if int(os.environ.get("RANK", "0")) == 0:
            write_report(out, args.quiet)
        return 0
    if not args.dataset or not args.data_root:
        raise UsageError("--dataset and --data-root are required (or --report)")
    _finish_args(args)
    rank, world, created = _init_distributed(args)
    try:
        code = _sweep(args, out, rank, world)
        if world > 1:
            dist.barrier()  # the other ranks wait for rank 0's files
        return code
    finally:
        if created:
            dist.destroy_process_group()


def _sweep(args, out: Path, rank: int, world: int) -> int:
    from tqdm.auto import tqdm

    if rank != 0:
        args.quiet = True  # progress and messages from rank 0 only
    # the same run gives the same numbers: cuDNN uses deterministic kernels, not the fastest it can time
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    device = torch.device(args.device)
    variants = dataset_variants(args)
    # every variant's files and split sizes, and every method, are checked before the first run is written
    datasets = {v: load_variant(args, v) for v in variants}
    first = datasets[variants[0]]
    blocks = _skeleton_blocks(args, first.num_classes)
    methods = _check_methods(args.methods, blocks)
    store = ResultStore(out / "results", args.shard)
    done = store.finished_ids()
    if world > 1:  # every rank must run the same list: rank 0's view of the finished runs
        box = [done]
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    source, source_hash = get_source_model(args, first, device)
    if args.pretrain_only:
        return 0
    cfg = protocol_config(args, source_hash)
    config_id = config_hash(cfg, 12)
    runs = shard_runs(enumerate_runs(variants, args.dataset, methods, args.lrs, args.seeds, config_id), args.shard)
    todo = [r for r in runs if r.run_id not in done]
    if not args.quiet:
        print(f"{len(runs)} runs in shard {args.shard[0]}/{args.shard[1]}, {len(runs) - len(todo)} already "
              f"finished, {len(todo)} to do", file=sys.stderr)
    if args.max_runs is not None:
        todo = todo[: args.max_runs]
    from . import protocol
    from .paper_adapter import prepare_data

    cache: dict[str, Any] = {}
    for run in tqdm(todo, desc="sweep", disable=args.quiet):
        if cache.get("variant") != run.dataset:
            cache.clear()  # one variant's data (and prefix activations) at a time
            cache["variant"] = run.dataset
            cache["data"] = datasets[run.dataset]
            cache["prefix"] = protocol.PrefixCache()
        data = cache["data"]
        prep_seed = run.seed
        prepared = cache.get("prepared")
        if prepared is None or not isinstance(prepared[0], tuple):
            prepared = prepare_data(data, seed=prep_seed, batch_size=args.batch_size,
                                    eval_batch_size=args.eval_batch_size, workers=args.workers,
                                    max_tensor_bytes=args.max_tensor_bytes)
            if isinstance(prepared[0], tuple):  # tensors: reuse for every run of this variant
                cache["prepared"] = prepared
        t0 = time.time()
        n_epochs = 0 if run.method == "none" else args.epochs
        with tqdm(total=n_epochs, desc=f"{run.method} lr={run.lr} seed={run.seed}", leave=False,
                  disable=args.quiet or n_epochs == 0) as bar:
            # share frozen-prefix activations across runs only for small (CIFAR-size) inputs: for 224-pixel
            # inputs they would take tens of GiB per prefix length
            share = isinstance(prepared[0], tuple) and data.input_size[-1] <= 64
            result = finetune(run, source, data, args, device, prepared=prepared,
                              prefix_cache=cache["prefix"] if share else None, progress=bar.update)
        record = {
            "run_id": run.run_id,
            "config_id": run.config_id,
            "config": cfg,
            "dataset": run.dataset,
            "family": run.family,
            "method": run.method,
            "lr": run.lr,
            "seed": run.seed,
            "epochs": n_epochs,
            "arch": args.arch,
            "block_order": blocks,
            **result,
            "time_s": round(time.time() - t0, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "host": socket.gethostname(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "world_size": world,
        }
        if rank == 0:
            store.append(record)
    if rank == 0:
        write_report(out, args.quiet)
    return 0


def _paper_blocks(model: nn.Module, arch: str) -> list[str]:
    from surgical_optim import block_names

    return block_names(model, paper_block_matcher(arch))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
