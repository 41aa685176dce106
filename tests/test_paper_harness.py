"""End-to-end tests of the paper harness (benchmarks/paper/) on fixture data in native layouts, on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks import paper  # noqa: E402
from benchmarks.paper import source, sweep  # noqa: E402
from benchmarks.paper.models import build_model, paper_block_matcher  # noqa: E402
from benchmarks.paper.results import summarise  # noqa: E402
from benchmarks.runs import ResultStore, read_results, select  # noqa: E402
from benchmarks.protocol import method_names  # noqa: E402
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
    assert paper.main(_cifar10c_args(tmp_path, methods="none,all,block:*,auto_rgn,auto_rgn_paper,auto_select")) == 0
    out = tmp_path / "out"
    records = read_results(out / "results")
    # 2 corruptions x (none: 2 seeds + (all + 3 blocks + auto_rgn + auto_rgn_paper) x 2 lrs x 2 seeds); auto_select
    # has no runs of its own
    assert len(records) == 2 * (2 + 6 * 2 * 2)
    methods = {r["method"] for r in records}
    assert methods == {"none", "all", "block:layer1", "block:layer2", "block:fc", "auto_rgn", "auto_rgn_paper"}
    for r in records:  # one epoch each (no --patience): it ran, and took steps
        trained = r["method"] != "none"
        assert r["extra"]["epochs_run"] == int(trained) and (r["extra"]["steps"] > 0) == trained
    for r in records:
        assert r["block_order"] == ["layer1", "layer2", "fc"]
        assert 0.0 <= r["best"]["test_acc"] <= 100.0
        assert len(r["val_curve"]) == (0 if r["method"] == "none" else 1)
    # the protocol precomputed the frozen prefix for the block runs, in blocks of the paper's split
    prefix = {r["method"]: r["extra"]["precomputed_prefix"] for r in records}
    assert prefix["block:layer1"] == 0 and prefix["block:layer2"] == 1 and prefix["block:fc"] == 2
    table = (out / "table.md").read_text()
    for label in ("No adaptation", "Full fine-tuning", "Block layer1", "Block layer2", "Block fc", "Auto-RGN",
                  "Auto-RGN (official protocol)", "Auto-select"):
        assert label in table
    assert "cifar10c/fog/5" in table and "cifar10c/gaussian_noise/5" in table
    assert "cifar10c (mean of 2)" in table
    assert "(ref 81.1)" in table  # the reference number beside full fine-tuning, on the family average
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
    real = sweep.finetune

    def counting(run, *a, **k):
        calls.append(run.run_id)
        return real(run, *a, **k)

    monkeypatch.setattr(sweep, "finetune", counting)
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
    real = source.train_source
    monkeypatch.setattr(source, "train_source", lambda *a, **k: trained.append(1) or real(*a, **k))
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


def test_auto_select_is_derived_per_seed_from_the_candidates_runs():
    """Per seed: each candidate's lr is selected as usual, then the candidate with the best validation accuracy
    (ties: lower loss) gives auto_select's numbers; a seed missing a candidate gets none."""
    def rec(method, lr, seed, val, test, loss=1.0):
        return {"run_id": f"{method}{lr}{seed}", "config_id": "c", "dataset": "d", "family": "d", "method": method,
                "lr": lr, "seed": seed, "block_order": ["a", "b"],
                "best": {"val_acc": val, "val_loss": loss, "test_acc": test}}

    runs = [rec("all", 0.1, 0, 60, 61), rec("all", 0.01, 0, 40, 90),
            rec("block:a", 0.1, 0, 70, 72, loss=0.9), rec("block:a", 0.01, 0, 20, 99),
            rec("block:b", 0.1, 0, 70, 75, loss=0.5),  # ties block:a on accuracy, lower loss: chosen for seed 0
            rec("all", 0.1, 1, 80, 81), rec("block:a", 0.1, 1, 50, 52), rec("block:b", 0.1, 1, 79, 10),
            rec("all", 0.1, 2, 99, 99), rec("block:a", 0.1, 2, 10, 10)]  # seed 2 lacks block:b
    s = summarise(runs)
    picks = s[("d", "auto_select")]["selected"]
    assert [(p["seed"], p["chosen"], p["lr"], p["test_acc"]) for p in picks] == [(0, "block:b", 0.1, 75),
                                                                                 (1, "all", 0.1, 81)]
    assert s[("d", "auto_select")]["test"].mean == pytest.approx(78.0)
    assert paper.runs_for(["none", "auto_select", "auto_rgn_paper", "all"], ["a", "b"]) == [
        "none", "block:a", "block:b", "all", "auto_rgn_paper"]


def test_method_expansion_and_blocks():
    model = build_model("resnet26", 10)
    blocks = paper.paper_blocks(model, "resnet26")
    assert blocks == ["block1", "block2", "block3", "fc"]
    ms = method_names(["none", "full", "first", "block:*", "linear_probe", "l1sp"], blocks)
    assert ms == ["none", "all", "block:block1", "block:block2", "block:block3", "block:fc", "l1_sp"]
    assert paper_block_matcher("resnet50")("conv1.weight") == "layer1"
    runs = paper.enumerate_runs(["d"], "d", ["none", "all"], [0.1, 0.01], [0, 1, 2], "cfg")
    assert len(runs) == 3 + 6 and len({r.run_id for r in runs}) == 9
    with pytest.raises(SystemExit):
        paper.build_parser().parse_args(["--shard", "3/3"])


# ---------------------------------------------------------------------------------------------- CLI errors
def _clean_failure(capsys, argv: list[str], out: Path) -> str:
    """Run the CLI expecting a clean failure: non-zero exit, one line on stderr, no result rows. The line."""
    try:
        code = paper.main(argv)
    except SystemExit as e:  # argparse's own errors exit this way
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code not in (0, None), err
    assert len(lines) == 1, err
    assert not read_results(out / "results"), "rows were written before the error"
    return lines[0]


def _layout_case(kind: str, tmp: Path) -> tuple[list[str], list[str]]:
    """(argv, fragments the error line must contain) for one broken or too-small dataset copy."""
    common = ["--arch", "tiny_cnn", "--epochs", "1", "--workers", "0", "--quiet", "--source-epochs", "1",
              "--out", str(tmp / "out")]
    if kind == "cifar10c_no_root":
        root = str(tmp / "nowhere")
        return ["--dataset", "cifar10c", "--data-root", root, *common], [root, "zenodo.org/record/2535967"]
    if kind == "cifar10c_no_labels":
        (tmp / "empty").mkdir()
        return (["--dataset", "cifar10c", "--data-root", str(tmp / "empty"), *common],
                ["labels.npy", str(tmp / "empty"), "zenodo.org/record/2535967"])
    if kind in ("cifar10c_second_corruption_missing", "cifar10c_defaults_on_small_copy"):
        argv = _cifar10c_args(tmp, corruptions="fog,snow" if kind.endswith("missing") else "fog")
        if kind.endswith("missing"):
            return argv, ["snow.npy", "zenodo.org/record/2535967"]
        argv = [a for a in argv if a not in ("--loader-arg", "target_train_per_class=5", "target_val_per_class=2")]
        return argv, ["target_train_per_class", "--loader-arg", "zenodo.org/record/2535967"]
    if kind == "cifar_flip_defaults_on_small_copy":  # the default 500 source-validation images per class
        _write_cifar10_batches(tmp / "cifar")
        return (["--dataset", "cifar_flip", "--data-root", str(tmp / "cifar"), "--loader-arg",
                 "target_train_per_class=4", *common], ["source_val_per_class", "--loader-arg", "cs.toronto.edu"])
    if kind == "cifar_flip_no_batches":
        (tmp / "cifar").mkdir()
        return (["--dataset", "cifar_flip", "--data-root", str(tmp / "cifar"), *common],
                [str(tmp / "cifar"), "data_batch_1", "cs.toronto.edu"])
    if kind == "imagenet_c_no_corruption":
        (tmp / "inc").mkdir()
        return (["--dataset", "imagenet_c", "--data-root", str(tmp / "inc"), "--corruptions", "fog", *common],
                [str(tmp / "inc" / "fog"), "zenodo.org/record/2235448"])
    if kind == "living17_default_hierarchy_folder":
        (tmp / "imagenet" / "train").mkdir(parents=True)
        root = str(tmp / "imagenet")
        return (["--dataset", "living17", "--data-root", root, *common],
                [str(Path(root) / "breeds"), "--breeds-info-dir", "BREEDS-Benchmarks"])
    if kind == "living17_given_hierarchy_folder":
        (tmp / "imagenet" / "train").mkdir(parents=True)
        given = str(tmp / "my hierarchy") + "/"  # shown as typed, trailing slash included
        return (["--dataset", "living17", "--data-root", str(tmp / "imagenet"), "--breeds-info-dir", given,
                 *common], [given, "class_hierarchy.txt", "BREEDS-Benchmarks"])
    if kind == "waterbirds_no_metadata":
        given = str(tmp / "birds")
        (tmp / "birds").mkdir()
        return (["--dataset", "waterbirds", "--data-root", given, "--imagenet-init", "0", *common],
                [f"metadata.csv in {given}", "waterbird_complete95_forest2water2.tar.gz"])
    if kind == "waterbirds_defaults_on_small_copy":  # 50 labeled images per group, the fixture has 2
        _write_waterbirds(tmp / "wb", per_group=(2, 2, 2, 2))
        return (["--dataset", "waterbirds", "--data-root", str(tmp / "wb"), "--imagenet-init", "0", *common],
                ["target_train_per_group", "--loader-arg", "waterbird_complete95_forest2water2.tar.gz"])
    if kind == "celeba_no_attributes":
        (tmp / "celeba").mkdir()
        return (["--dataset", "celeba", "--data-root", str(tmp / "celeba"), "--imagenet-init", "0", *common],
                ["list_attr_celeba.txt", str(tmp / "celeba"), "mmlab.ie.cuhk.edu.hk"])
    raise AssertionError(kind)


LAYOUT_CASES = ["cifar10c_no_root", "cifar10c_no_labels", "cifar10c_second_corruption_missing",
                "cifar10c_defaults_on_small_copy", "cifar_flip_defaults_on_small_copy", "cifar_flip_no_batches",
                "imagenet_c_no_corruption", "living17_default_hierarchy_folder", "living17_given_hierarchy_folder",
                "waterbirds_no_metadata", "waterbirds_defaults_on_small_copy", "celeba_no_attributes"]


@pytest.mark.parametrize("kind", LAYOUT_CASES)
def test_layout_errors_are_one_line_naming_the_path_and_the_source(tmp_path, capsys, kind):
    argv, fragments = _layout_case(kind, tmp_path)
    line = _clean_failure(capsys, argv, tmp_path / "out")
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    if kind == "waterbirds_no_metadata":  # the folder the user gave, not a subfolder the loader made up
        assert "waterbird_complete95_forest2water2/metadata.csv" not in line, line
    if kind == "living17_default_hierarchy_folder":
        assert "imagenet/class_hierarchy.txt" not in line, line


def _bad_argument_case(kind: str, tmp: Path) -> tuple[list[str], str]:
    """(argv, a fragment the error line must contain) for one bad command line on valid CIFAR-10-C data."""
    argv = _cifar10c_args(tmp, corruptions="fog", methods="none,all")
    if kind == "missing_dataset":
        return ["--data-root", str(tmp), "--out", str(tmp / "out")], "--dataset"
    if kind == "report_without_results":
        return ["--report", "--out", str(tmp / "out")], str(tmp / "out")
    if kind == "imagenet_weights_not_cached":  # TORCH_HOME points into tmp (see the test)
        _write_waterbirds(tmp / "wb", per_group=(2, 2, 2, 2))
        return (["--dataset", "waterbirds", "--data-root", str(tmp / "wb"), "--imagenet-init", "1",
                 "--loader-arg", "target_train_per_group=1", "--out", str(tmp / "out"), "--quiet"],
                "resnet50-0676ba61.pth")
    if kind == "missing_checkpoint":
        i = argv.index("--source-checkpoint")
        argv[i + 1] = str(tmp / "no.pt")
        return argv, str(tmp / "no.pt")
    extra = {
        "lrs": (["--lrs", "0.1,abc"], "--lrs"),
        "seeds": (["--seeds", "x"], "--seeds"),
        "method": (["--methods", "none,bogus"], "bogus"),
        "block": (["--methods", "block:nope"], "layer1"),  # names the blocks there are
        "loader_key": (["--loader-arg", "nokey=1"], "nokey"),
        "loader_form": (["--loader-arg", "target_train_per_class"], "KEY=VALUE"),
        "loader_type": (["--loader-arg", "target_val_per_class=two"], "target_val_per_class"),
        "corruption": (["--corruptions", "fog,notacorruption"], "notacorruption"),
        "severity": (["--severity", "9"], "--severity"),
        "arch_mismatch": (["--arch", "resnet26"], "--arch"),  # the checkpoint is a tiny_cnn
    }[kind]
    return argv + extra[0], extra[1]


BAD_ARGUMENTS = ["missing_dataset", "report_without_results", "imagenet_weights_not_cached", "missing_checkpoint", "lrs", "seeds", "method", "block", "loader_key",
                 "loader_form", "loader_type", "corruption", "severity", "arch_mismatch"]


@pytest.mark.parametrize("kind", BAD_ARGUMENTS)
def test_bad_arguments_are_one_line(tmp_path, capsys, monkeypatch, kind):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached ImageNet weights
    argv, fragment = _bad_argument_case(kind, tmp_path)
    line = _clean_failure(capsys, argv, tmp_path / "out")
    assert fragment in line, line
    assert "Traceback" not in line


def test_debug_flag_shows_the_traceback(tmp_path):
    argv, _ = _layout_case("cifar10c_no_labels", tmp_path)
    with pytest.raises(FileNotFoundError, match="labels.npy"):
        paper.main(argv + ["--debug"])


def test_command_line_prints_one_line_and_exits_non_zero(tmp_path):
    """The module run as a program (what users type): no traceback, one line, exit status non-zero."""
    missing = str(tmp_path / "CIFAR-10-C")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.paper", "--dataset", "cifar10c", "--data-root", missing,
                           "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert missing in proc.stderr and "zenodo.org" in proc.stderr


# ---------------------------------------------------------------------------------------------- reproducibility
def test_two_fresh_runs_give_the_same_numbers(tmp_path):
    """Same command, two fresh --out folders: the same pre-trained source model and the same results,
    whatever the random state the process was in before (the model is built after seeding)."""
    _write_cifar10_batches(tmp_path / "cifar")
    common = [a if a != "0,1" else "0" for a in COMMON]
    args = ["--dataset", "cifar_flip", "--data-root", str(tmp_path / "cifar"), "--methods", "none,all,auto_rgn",
            "--source-epochs", "1", "--source-lr", "0.05", "--source-batch-size", "64",
            "--loader-arg", "target_train_per_class=4", "--loader-arg", "target_val_per_class=2",
            "--loader-arg", "source_val_per_class=6", *common]
    runs = {}
    for name, state_before in (("a", 1), ("b", 2)):
        torch.manual_seed(state_before)  # what ran before in this process must not matter
        assert paper.main(args + ["--out", str(tmp_path / name)]) == 0
        (model,) = (tmp_path / name / "source_models").glob("cifar_flip-tiny_cnn-*.pt")
        records = {r["run_id"]: r for r in read_results(tmp_path / name / "results")}
        runs[name] = (model.name, torch.load(model, weights_only=True), records)
    (name_a, weights_a, rows_a), (name_b, weights_b, rows_b) = runs["a"], runs["b"]
    assert name_a == name_b  # one config hash ...
    for key, tensor in weights_a.items():  # ... one source model
        assert torch.equal(tensor, weights_b[key]), key
    assert set(rows_a) == set(rows_b) and len(rows_a) == 1 + 2 * 2  # none + (all, auto_rgn) x 2 lrs, 1 seed
    for run_id, row in rows_a.items():
        assert row["best"] == rows_b[run_id]["best"], row["method"]
        assert row["val_curve"] == rows_b[run_id]["val_curve"], row["method"]
