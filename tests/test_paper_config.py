"""The harness's command line is parsed once into typed, frozen configs (benchmarks/paper/config.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("torchvision")

from benchmarks.paper import build_parser, harness_config  # noqa: E402
from benchmarks.paper.config import DataConfig, FinetuneConfig, HarnessConfig, SourceConfig, UsageError  # noqa: E402
from benchmarks.paper.finetune import protocol_config  # noqa: E402
from benchmarks.paper.sweep import run_identity  # noqa: E402
from benchmarks.protocol import PAPER_LRS  # noqa: E402


def _config(*argv: str) -> HarnessConfig:
    return harness_config(build_parser().parse_args(["--data-root", "/data", *argv]))


def test_family_defaults_fill_what_the_command_line_leaves_out():
    cfg = _config("--dataset", "cifar10c", "--out", "runs/c")
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.source, SourceConfig)
    assert isinstance(cfg.finetune, FinetuneConfig)
    assert (cfg.source.arch, cfg.finetune.epochs, cfg.source.epochs, cfg.source.imagenet_init) == (
        "resnet26", 15, 200, False)
    assert cfg.finetune.lrs == PAPER_LRS and cfg.finetune.seeds == (0, 1, 2)
    assert cfg.source.cache == Path("runs/c") / "source_models"
    assert cfg.data.variants()[0] == f"cifar10c/{cfg.data.corruptions[0]}/5"
    imagenet = _config("--dataset", "imagenet_c", "--epochs", "3", "--imagenet-init", "0")
    assert (imagenet.source.arch, imagenet.finetune.epochs, imagenet.source.imagenet_init) == ("resnet50", 3, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.finetune.epochs = 1  # type: ignore[misc]


@pytest.mark.parametrize("argv, fragment", [
    (["--epochs", "0"], "--epochs"),
    (["--lrs", "0.1,-1"], "--lrs"),
    (["--methods", " , "], "--methods"),
    (["--loader-arg", "seed=3"], "--data-seed"),
    (["--patience", "0"], "--patience"),
])
def test_bad_values_are_usage_errors(argv, fragment):
    with pytest.raises(UsageError, match=fragment):
        _config("--dataset", "cifar_flip", *argv)


def test_patience_reaches_the_protocol_and_joins_the_run_identity_only_when_set():
    """Without --patience, a run's identity has no patience key; with it, the key joins. The identity names
    the protocol's version, so runs stored before its numbers changed (fused Adam, the accuracy plateau)
    are not taken for runs of this one."""
    plain = _config("--dataset", "cifar_flip")
    patient = _config("--dataset", "cifar_flip", "--patience", "3")
    assert plain.finetune.patience is None and patient.finetune.patience == 3
    assert protocol_config(patient.finetune, 0.1, "tiny_cnn", "cpu").patience == 3
    assert protocol_config(plain.finetune, 0.1, "tiny_cnn", "cpu").patience is None
    assert set(run_identity(plain, "src")) == {"source", "epochs", "batch_size", "weight_decay", "data_seed",
                                              "loader_kwargs", "l1sp_weight", "snr_threshold", "protocol"}
    assert run_identity(plain, "src")["protocol"] >= 2  # 0.4.0's runs had no version (version 1)
    assert run_identity(patient, "src") == {**run_identity(plain, "src"), "patience": 3}
