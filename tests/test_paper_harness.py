"""End-to-end tests of the paper harness (benchmarks/paper.py) on fixture data in native layouts, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks import paper  # noqa: E402
from benchmarks.paper_models import build_model, paper_block_matcher  # noqa: E402
from benchmarks.paper_results import ResultStore, read_results, select, summarise  # noqa: E402
try:  # the native-layout fixture writers live in test_datasets.py
    from test_datasets import (  # noqa: E402
        _jpeg,
        _write_celeba,
        _write_cifar10_batches,
        _write_cifar10c,
        _write_hierarchy,
        _write_waterbirds,
    )
except ImportError:  # tests/ imported as a package
    from tests.test_datasets import (  # noqa: E402
        _jpeg,
        _write_celeba,
        _write_cifar10_batches,
        _write_cifar10c,
        _write_hierarchy,
        _write_waterbirds,
    )

pytestmark = pytest.mark.usefixtures("one_thread")


COMMON = ["--arch", "tiny_cnn", "--epochs", "1", "--lrs", "1e-2,1e-3", "--seeds", "0,1", "--workers", "0",
          "--quiet"]


def _tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    m = build_model("tiny_cnn", 10)
    # saved the way RobustBench / DDP scripts do: under "state_dict", with a "module." prefix
    torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, path)
    return path


def _cifar10c_args(tmp_path: Path, *extra: str, corruptions: str = "fog,gaussian_noise",
                   methods: str = "none,all,block:*,auto_rgn") -> list[str]:
    _write_cifar10c(tmp_path / "c10c")
    ckpt = _tiny_checkpoint(tmp_path / "tiny.pt")
    return ["--dataset", "cifar10c", "--data-root", str(tmp_path / "c10c"), "--corruptions", corruptions,
            "--source-checkpoint", str(ckpt), "--methods", methods,
            "--loader-arg", "target_train_per_class=5", "--loader-arg", "target_val_per_class=2",
            "--out", str(tmp_path / "out"), *COMMON, *extra]


def test_end_to_end_cifar10c_table_and_plot(tmp_path):
    assert paper.main(_cifar10c_args(tmp_path)) == 0
    out = tmp_path / "out"
    records = read_results(out / "results")
    # 2 corruptions x (none: 2 seeds + (all + 3 blocks + auto_rgn) x 2 lrs x 2 seeds)
    assert len(records) == 2 * (2 + 5 * 2 * 2)
    methods = {r["method"] for r in records}
    assert methods == {"none", "all", "block:layer1", "block:layer2", "block:fc", "auto_rgn"}
    for r in records:
        assert r["block_order"] == ["layer1", "layer2", "fc"]
        assert 0.0 <= r["best"]["test_acc"] <= 100.0
        assert len(r["val_curve"]) == (0 if r["method"] == "none" else 1)
    # the protocol precomputed the frozen prefix for the block runs (paper block -> library block index)
    prefix = {r["method"]: r["extra"]["precomputed_prefix"] for r in records}
    assert prefix["block:layer1"] == 0 and prefix["block:layer2"] == 2 and prefix["block:fc"] == 3
    table = (out / "table.md").read_text()
    for label in ("No adaptation", "Full fine-tuning", "Block layer1", "Block layer2", "Block fc", "Auto-RGN"):
        assert label in table
    assert "cifar10c/fog/5" in table and "cifar10c/gaussian_noise/5" in table
    assert "cifar10c (mean of 2)" in table
    assert "(ref 81.1)" in table  # paper.md reference beside full fine-tuning, on the family average
    assert "±" in table  # two seeds -> mean ± s.e.
    assert (out / "relative_to_full_ft.png").stat().st_size > 1000
    # the table is regenerated from the JSON lines alone
    (out / "table.md").unlink()
    (out / "relative_to_full_ft.png").unlink()
    assert paper.main(["--report", "--out", str(out), "--quiet"]) == 0
    assert (out / "table.md").read_text() == table
    assert (out / "relative_to_full_ft.png").is_file()


def test_resume_skips_finished_runs_and_shards(tmp_path, monkeypatch):
    args = _cifar10c_args(tmp_path, "--max-runs", "5", corruptions="fog", methods="none,all,last")
    calls = []
    real = paper.finetune

    def counting(run, *a, **k):
        calls.append(run.run_id)
        return real(run, *a, **k)

    monkeypatch.setattr(paper, "finetune", counting)
    assert paper.main(args) == 0  # interrupted sweep: only 5 runs
    assert len(calls) == 5 and len(read_results(tmp_path / "out" / "results")) == 5
    calls.clear()
    full = [a for a in args if a not in ("--max-runs", "5")]
    assert paper.main(full) == 0
    assert len(calls) == 10 - 5  # the 5 finished runs are skipped
    assert not set(calls) & {r["run_id"] for r in read_results(tmp_path / "out" / "results")[:5]}
    calls.clear()
    assert paper.main(full) == 0
    assert calls == []  # everything finished
    assert len(read_results(tmp_path / "out" / "results")) == 10
    # shards partition the run list
    out2 = tmp_path / "out2"
    shard_args = [a if a != str(tmp_path / "out") else str(out2) for a in full]
    ids = []
    for i in range(3):
        calls.clear()
        assert paper.main(shard_args + ["--shard", f"{i}/3"]) == 0
        ids.append(set(calls))
        assert (out2 / "results" / f"runs-shard{i}of3.jsonl").is_file()
    assert sum(len(s) for s in ids) == 10 and len(set().union(*ids)) == 10


def test_store_appends_atomically(tmp_path):
    store = ResultStore(tmp_path, (1, 4))
    for i in range(3):
        store.append({"run_id": f"r{i}", "x": i})
    lines = (tmp_path / "runs-shard1of4.jsonl").read_text().splitlines()
    assert [json.loads(s)["run_id"] for s in lines] == ["r0", "r1", "r2"]
    assert store.finished_ids() == {"r0", "r1", "r2"}
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_selection_and_standard_error():
    def rec(method, lr, seed, val, test, loss=1.0):
        return {"run_id": f"{method}{lr}{seed}", "config_id": "c", "dataset": "d", "family": "d", "method": method,
                "lr": lr, "seed": seed, "best": {"val_acc": val, "val_loss": loss, "test_acc": test}}

    runs = [rec("all", 0.1, 0, 50, 10), rec("all", 0.01, 0, 70, 20), rec("all", 0.001, 0, 70, 30, loss=0.5),
            rec("all", 0.1, 1, 60, 40), rec("all", 0.01, 1, 10, 99)]
    assert select([r for r in runs if r["seed"] == 0])["lr"] == 0.001  # tie on val acc -> lower val loss
    s = summarise(runs)[("d", "all")]
    assert s["test"].n == 2 and s["test"].mean == pytest.approx(35.0) and s["test"].se == pytest.approx(5.0)


def test_pretrains_and_caches_source_model_cifar_flip(tmp_path, monkeypatch):
    _write_cifar10_batches(tmp_path / "cifar")
    args = ["--dataset", "cifar_flip", "--data-root", str(tmp_path / "cifar"), "--methods", "none,block:fc",
            "--source-epochs", "1", "--source-lr", "0.05", "--source-batch-size", "64",
            "--loader-arg", "target_train_per_class=4", "--loader-arg", "target_val_per_class=2",
            "--loader-arg", "source_val_per_class=6", "--out", str(tmp_path / "out"), *COMMON]
    trained = []
    real = paper.train_source
    monkeypatch.setattr(paper, "train_source", lambda *a, **k: trained.append(1) or real(*a, **k))
    assert paper.main(args) == 0
    models = list((tmp_path / "out" / "source_models").glob("cifar_flip-tiny_cnn-*.pt"))
    assert len(models) == 1 and models[0].with_suffix(".json").is_file() and trained == [1]
    # second invocation (new seed): the cached source model is reused, not re-trained
    assert paper.main(args[:-len(COMMON)] + [a if a != "0,1" else "2" for a in COMMON]) == 0
    assert trained == [1]
    records = read_results(tmp_path / "out" / "results")
    assert {r["seed"] for r in records} == {0, 1, 2}
    assert len({r["config"]["source"] for r in records}) == 1


def test_waterbirds_worst_group_in_table(tmp_path):
    _write_waterbirds(tmp_path / "wb", per_group=(4, 4, 4, 4))
    args = ["--dataset", "waterbirds", "--data-root", str(tmp_path / "wb"), "--methods", "none,last",
            "--imagenet-init", "0", "--source-epochs", "1", "--source-lr", "0.01",
            "--loader-arg", "target_train_per_group=2", "--out", str(tmp_path / "out"),
            *[a if a != "0,1" else "0" for a in COMMON], "--max-tensor-gib", "0"]  # stream with DataLoaders (the large-dataset path)
    assert paper.main(args) == 0
    records = read_results(tmp_path / "out" / "results")
    assert {r["method"] for r in records} == {"none", "block:fc"}
    for r in records:
        assert r["best"]["test_worst"] is not None and set(r["best"]["test_group_accs"]) == {"0", "1", "2", "3"}
    assert "wg" in (tmp_path / "out" / "table.md").read_text()


def test_living17_from_imagenet_folder_and_celeba(tmp_path):
    # Living-17 through the CLI: 17 superclasses (checked), source model trained here, disjoint subclasses
    root = tmp_path / "imagenet"
    leaves = _write_hierarchy(root / "breeds", {f"super {i}": 4 for i in range(17)}, extra_levels=4,
                              ancestor="n00004258")
    k = 0
    for ls in leaves.values():
        for w in ls:
            for split, n in (("train", 3), ("val", 1)):
                for j in range(n):
                    k += 1
                    _jpeg(root / split / w / f"{w}_{j}.JPEG", seed=k)
    common = [a if a != "0,1" else "0" for a in COMMON]
    args = ["--dataset", "living17", "--data-root", str(root), "--methods", "none,first", "--source-epochs", "1",
            "--loader-arg", "target_train_per_class=2", "--loader-arg", "target_val_per_class=1",
            "--out", str(tmp_path / "out"), *common]
    assert paper.main(args) == 0
    meta = json.loads(next((tmp_path / "out" / "source_models").glob("living17-*.json")).read_text())
    split = meta["config"]["data_info"]
    assert len(split["superclasses"]) == 17
    for src, tgt in zip(split["source"], split["target"]):
        assert len(src) == len(tgt) == 2 and not set(src) & set(tgt)
    _write_celeba(tmp_path / "celeba", per_group=2)
    args = ["--dataset", "celeba", "--data-root", str(tmp_path / "celeba"), "--methods", "none,last",
            "--imagenet-init", "0", "--source-epochs", "1", "--loader-arg", "target_train_per_group=1",
            "--out", str(tmp_path / "out"), *common]
    assert paper.main(args) == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| method | celeba | living17 |" in table and "(ref 73.2)" in table and "wg" in table


def test_method_expansion_and_blocks():
    model = build_model("resnet26", 10)
    blocks = paper._paper_blocks(model, "resnet26")
    assert blocks == ["block1", "block2", "block3", "fc"]
    ms = paper._expand_methods(["none", "full", "first", "block:*", "linear_probe", "l1sp"], blocks)
    assert ms == ["none", "all", "block:block1", "block:block2", "block:block3", "block:fc", "l1_sp"]
    assert paper_block_matcher("resnet50")("conv1.weight") == "layer1"
    runs = paper.enumerate_runs(["d"], "d", ["none", "all"], [0.1, 0.01], [0, 1, 2], "cfg")
    assert len(runs) == 3 + 6 and len({r.run_id for r in runs}) == 9
    with pytest.raises(SystemExit):
        paper.build_parser().parse_args(["--shard", "3/3"])
