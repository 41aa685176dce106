"""The offline reproduction (benchmarks/offline): data, shifts, theory check, and the --quick pipeline."""

from __future__ import annotations

import json
import queue
import threading
from concurrent.futures import Executor, Future
from dataclasses import replace

import pytest
import torch

from benchmarks.offline import data
from benchmarks.offline.model import SmallResNet
from benchmarks.offline.shifts import SHIFTS, Shift, noise_shifts, perturb_block, target_splits
from benchmarks.offline.theory import TwoLayerConfig, run_two_layer

SHIFT = {s.name: s for s in SHIFTS}
IDENTITY = Shift("identity", "none", "the source distribution itself")


def test_sample_is_deterministic_and_balanced():
    a = data.sample(40, 5)
    b = data.sample(40, 5)
    c = data.sample(40, 6)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["x"], c["x"])
    assert a["x"].shape == (40, 3, 32, 32)
    assert 0.0 <= float(a["x"].min()) and float(a["x"].max()) <= 1.0
    assert torch.bincount(a["y"], minlength=10).tolist() == [4] * 10
    assert set(a["style"].tolist()) <= set(data.SOURCE_STYLES)


def test_cue_pairing_and_groups():
    src = data.sample(2000, 1, cue_agree=0.9)
    agree = (src["cue"] == src["y"]).float().mean()
    assert 0.85 < float(agree) < 0.95
    flip = data.sample(2000, 1, cue_agree=0.9, cue_map="shift")
    majority = flip["cue"] == (flip["y"] + 1) % 10
    assert torch.equal(flip["group"], (~majority).long())
    assert torch.equal(flip["cue"][~majority], flip["y"][~majority])  # minority keeps the source pairing
    none = data.sample(20, 1, cue_agree=None)
    assert (none["cue"] == -1).all()


def test_absent_hides_the_main_shape_only():
    d = data.sample(200, 3, cue_agree=None, absent=0.5)
    hidden = d["absent"]
    assert 0 < int(hidden.sum()) < 200
    # with neither shape nor cue, a hidden image is background + gradient + faint noise: low variance
    spread = d["x"].flatten(1).std(1)
    assert float(spread[hidden].mean()) < float(spread[~hidden].mean())


@pytest.mark.parametrize("name", list(data.CORRUPTIONS))
def test_corruptions_change_pixels_only(name):
    clean = target_splits(IDENTITY, 0, per_class=2, val_per_class=1, test_per_class=1)
    bad = target_splits(SHIFT[name], 0, per_class=2, val_per_class=1, test_per_class=1)
    for split in ("train", "val", "test"):
        xc, yc = clean[split][:2]
        xb, yb = bad[split][:2]
        assert torch.equal(yc, yb)
        assert xb.shape == xc.shape and not torch.equal(xb, xc)
        assert torch.equal(xb, data.corrupt(xc, name, _split_seed(0, split)))


def _split_seed(seed: int, split: str) -> int:
    return 7_000_000 + 1000 * seed + 97 * ("train", "val", "test").index(split)


def test_label_permutation_changes_labels_only():
    clean = target_splits(IDENTITY, 1, per_class=2, val_per_class=1, test_per_class=1)
    perm = target_splits(SHIFT["label_permutation"], 1, per_class=2, val_per_class=1, test_per_class=1)
    for split in ("train", "val", "test"):
        assert torch.equal(clean[split][0], perm[split][0])
        assert torch.equal(perm[split][1], 9 - clean[split][1])
        assert not (perm[split][1] == clean[split][1]).any()  # a derangement: no-adaptation accuracy 0


def test_subpopulation_shift_changes_which_styles_appear():
    assert set(SHIFT["unseen_styles"].styles).isdisjoint(data.SOURCE_STYLES)
    d = data.sample(100, 0, styles=SHIFT["unseen_styles"].styles)
    assert set(d["style"].tolist()) == set(SHIFT["unseen_styles"].styles)
    assert SHIFT["unseen_styles"].corruption is None and not SHIFT["unseen_styles"].permute_labels


def test_spurious_shift_has_groups_on_test_only():
    sp = target_splits(SHIFT["spurious_flip"], 0, per_class=2, val_per_class=1, test_per_class=10)
    assert len(sp["train"]) == 2 and len(sp["val"]) == 2 and len(sp["test"]) == 3
    assert set(sp["test"][2].tolist()) <= {0, 1}


def test_shift_kinds():
    kinds = {s.name: s.kind for s in SHIFTS}
    assert {k for k in kinds.values()} == {"input", "feature", "output"}
    assert all(s.kind == "block-noise" for s in noise_shifts({b: 2.0 for b in ("layer1", "layer2", "layer3", "layer4")}))


def test_perturb_block_changes_only_that_block():
    torch.manual_seed(0)
    model = SmallResNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perturb_block(model, "layer2", 1.0, seed=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("layer2.") for k in changed)
    assert all("conv" in k or "downsample.0" in k for k in changed)  # weights (dim > 1) only


def test_small_resnet_blocks():
    from surgical_optim import block_names

    model = SmallResNet()
    assert block_names(model) == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    n = sum(p.numel() for p in model.parameters())
    assert 250_000 < n < 350_000
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_two_layer_check_structure_and_last_layer_fixes_label_scaling():
    out = run_two_layer(TwoLayerConfig(d=6, k=8, ns=(24,), steps=300, seeds=(0, 1, 2), n_eval=500))
    res = out["results"]
    assert set(res) == {"input", "output"}
    by_m = res["output"]["24"]
    assert set(by_m) == {"none", "first", "last", "all"}
    # y_t = t y_s is solved exactly by rescaling the last layer
    assert by_m["last"]["mean"] < 0.05
    json.dumps(out)


def test_quick_pipeline_end_to_end(tmp_path):
    """`python -m benchmarks.offline --quick` runs end to end and writes every output; a re-run reuses
    every cached run. (Checks the pipeline, not the science.)"""
    from benchmarks.offline.__main__ import main

    out = tmp_path / "offline"
    assert main(["--quick", "--out", str(out), "--no-progress"]) == 0
    for name in ("table.md", "summary.json", "relative_to_full_ft.png", "auto_rgn_multipliers.png", "block_noise.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert {e["type"] for e in summary["shifts"].values()} == {"input", "feature", "output"}
    for entry in summary["shifts"].values():
        for method in ("none", "all", "stem", "layer1", "layer4", "fc", "auto_rgn", "auto_rgn_paper", "auto_snr",
                       "auto_select"):
            m = entry["methods"][method]
            assert len(m["accs"]) == 1 and {"mean", "stderr"} <= set(m)
    assert "worst_group" in summary["shifts"]["spurious_flip"]["methods"]["fc"]
    assert summary["shifts"]["gaussian_noise"]["methods"]["auto_rgn"]["block_multipliers"]
    assert summary["block_noise"] and summary["two_layer"]["results"]
    table = (out / "table.md").read_text()
    assert "| shift |" in table and "**" in table and "worst group" in table
    assert summary["runs_cached"] == 0

    # second invocation: everything comes from the cache
    assert main(["--quick", "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["runs_cached"] == again["runs_total"]
    assert again["shifts"]["blur"]["methods"]["all"]["accs"] == summary["shifts"]["blur"]["methods"]["all"]["accs"]


def test_interrupted_run_keeps_finished_runs(tmp_path):
    """Finished runs are files; deleting one (as if the run had been interrupted) re-runs only it."""
    from benchmarks.offline.runner import quick_config, run

    cfg = replace(quick_config(str(tmp_path)), workers=1, methods=("none", "fc"), seeds=(0,))
    first = run(cfg, progress=False, log=lambda *_: None)
    assert first["runs_cached"] == 0
    files = sorted((tmp_path / "cache" / "runs").rglob("*.json"))
    assert len(files) == first["runs_total"]
    files[0].unlink()
    second = run(cfg, progress=False, log=lambda *_: None)
    assert second["runs_cached"] == second["runs_total"] - 1


class _ManualExecutor(Executor):
    """Holds every submitted job until the test runs it, so the test decides the order jobs finish in."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self.jobs.put((fn, args, future))
        return future


def test_a_seeds_runs_are_queued_as_soon_as_its_source_model_is_ready(tmp_path):
    """Seed 0's runs go to the pool the moment seed 0's source model is ready, while seeds 1 and 2 still
    pre-train (so a worker that finishes a source model starts on runs instead of idling until every source
    model is done); then every job completes."""
    from benchmarks.offline import runner
    from benchmarks.offline.pretrain import source_path

    threads = torch.get_num_threads()  # the jobs below set one thread, as a worker does
    cfg = replace(runner.quick_config(str(tmp_path)), methods=("none",), seeds=(0, 1, 2), rows=("blur",))
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(parents=True)
    paths = {s: str(source_path(cfg.source_config(s), cache_dir)) for s in cfg.seeds}
    pool, schedule = _ManualExecutor(), runner._Schedule(cfg, cache_dir, lambda *_: None)
    thread = threading.Thread(target=schedule.run, args=(pool, {"cached": True}, tmp_path / "theory.json", False))
    thread.start()
    try:
        sources = [pool.jobs.get(timeout=60) for _ in cfg.seeds]
        assert [fn.__name__ for fn, _, _ in sources] == ["_prepare_source"] * 3 and pool.jobs.empty()
        fn, args, future = sources[0]
        future.set_result(fn(*args))
        fn, args, future = pool.jobs.get(timeout=60)
        assert fn.__name__ == "_run_task" and args[0].seed == 0
        assert not sources[1][2].done() and not sources[2][2].done()
        runner._init_worker(paths)
        future.set_result(fn(*args))
        for fn, args, future in sources[1:]:
            future.set_result(fn(*args))
        while thread.is_alive() or not pool.jobs.empty():
            try:
                fn, args, future = pool.jobs.get(timeout=1)
            except queue.Empty:
                continue
            future.set_result(fn(*args))
        thread.join(timeout=60)
    finally:
        torch.set_num_threads(threads)
    assert set(schedule.sources) == {0, 1, 2}
    assert schedule.total == schedule.todo == 3 and {t.seed for t in schedule.results} == {0, 1, 2}


def test_calibrate_noise_picks_from_the_ladder():
    from benchmarks.offline.shifts import calibrate_noise

    torch.manual_seed(0)
    model = SmallResNet().eval()
    first = calibrate_noise(model, ("layer2",), ladder=(1.0, 2.0), target_acc=1.01, n=20)
    assert first["layer2"]["scale"] == 1.0 and len(first["layer2"]["tried"]) == 1
    last = calibrate_noise(model, ("layer2",), ladder=(1.0, 2.0), target_acc=0.0, n=20)
    assert last["layer2"]["scale"] == 2.0 and len(last["layer2"]["tried"]) == 2


def test_each_seed_has_its_own_source_model(tmp_path):
    """The spread over seeds includes the source model's: seed s pre-trains with pretrain.seed + s, and its
    runs (and block-noise scales) come from that model."""
    from benchmarks.offline.runner import quick_config, run

    cfg = replace(quick_config(str(tmp_path)), workers=1, methods=("none",), seeds=(0, 1))
    raw = run(cfg, progress=False, log=lambda *_: None)
    paths = {s: src["path"] for s, src in raw["sources"].items()}
    assert len(set(paths.values())) == 2
    assert {src["seed"] for src in raw["sources"].values()} == {cfg.pretrain.seed, cfg.pretrain.seed + 1}
    blobs = [torch.load(p, weights_only=True)["state_dict"] for p in paths.values()]
    assert not torch.equal(blobs[0]["conv1.weight"], blobs[1]["conv1.weight"])
    # the unadapted models differ on the same row (the quick models are near chance: compare losses)
    none = {t.seed: r["test_loss"] for t, r in raw["results"].items() if t.shift.name == "contrast"}
    assert none[0] != none[1]


def test_ablation_reuses_the_main_jobs_full_fine_tuning_runs(tmp_path):
    """A run's cache key holds only its own method's options: an ablation of Auto-RGN's options re-runs
    Auto-RGN, never full fine-tuning, and the two Auto-RGN variants get different keys."""
    from benchmarks.offline.ablation import ablation_config
    from benchmarks.offline.runner import Task, _task_path, quick_config

    base = quick_config(str(tmp_path))
    variant = ablation_config(base, "quantile_0.9")
    assert variant.methods == ("all", "auto_rgn")
    assert variant.method_options["auto_rgn"] == {"quantile": 0.9}
    keys = {0: "source-x"}
    for cfg in (base, variant):
        cfg.noise_scales = {0: {}}
    full, rgn = Task(SHIFT["blur"], 0, "all"), Task(SHIFT["blur"], 0, "auto_rgn")
    assert _task_path(base, keys, full) == _task_path(variant, keys, full)
    assert _task_path(base, keys, rgn) != _task_path(variant, keys, rgn)
    short = ablation_config(base, "every_step_short_budget")
    short.noise_scales = {0: {}}
    assert (short.batch_size, short.epochs, short.patience) == (64, 15, None)
    assert _task_path(base, keys, full) != _task_path(short, keys, full)


def test_ablation_table_reports_gaps_to_full_fine_tuning():
    from benchmarks.offline.ablation import ablation_row, ablation_table

    def entry(all_accs, rgn_accs):
        def m(accs):
            return {"accs": accs, "mean": sum(accs) / len(accs), "stderr": 0.0, "epoch": [1], "lr": [1e-3]}
        return {"methods": {"all": m(all_accs), "auto_rgn": m(rgn_accs)}}

    summary = {"shifts": {"a": entry([50.0, 60.0], [40.0, 44.0]), "b": entry([70.0, 70.0], [71.0, 73.0])},
               "block_noise": {}, "setup": {"seeds": [0, 1]}}
    row = ablation_row("every_step", summary)
    assert row["rows"]["a"]["minus_all"] == pytest.approx(-13.0)
    assert row["rows"]["b"]["minus_all"] == pytest.approx(2.0)
    assert row["mean_minus_all"] == pytest.approx(-5.5) and row["rows_at_or_above_all"] == 1
    table = ablation_table([row])
    assert "| `every_step` | -13.0 | +2.0 | -5.5 | 1/2 |" in table


def test_unknown_row_is_one_line_and_exit_status_2(tmp_path, capsys):
    from benchmarks.offline.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--out", str(tmp_path), "--no-progress", "--workers", "1", "--rows", "gaussian_nois"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "unknown row(s) gaussian_nois" in err[-1] and "gaussian_noise" in err[-1]


def test_stream_flag_runs_the_unlabeled_stream_per_seed_and_caches_it(tmp_path):
    """`--stream` adds the unlabeled-stream experiment: every stream shift and seed, scored runs at an lr
    chosen on the held-out stream, written to stream.md / stream.json / stream_curves.png; a re-run reuses
    every stream."""
    from benchmarks.offline.__main__ import main
    from benchmarks.offline.stream import STREAM_SHIFTS

    out = tmp_path / "offline"
    args = ["--quick", "--out", str(out), "--no-progress", "--workers", "1", "--stream"]
    assert main(args) == 0
    streams = json.loads((out / "stream.json").read_text())
    assert {r["shift"] for r in streams["scored"]} == {s.name for s in STREAM_SHIFTS}
    assert all(not r["held_out"] for r in streams["scored"]) and streams["streams_cached"] == 0
    assert (out / "stream_curves.png").stat().st_size > 0
    assert "| first |" in (out / "stream.md").read_text()
    assert main(args) == 0
    again = json.loads((out / "stream.json").read_text())
    assert again["streams_cached"] == again["streams"]
    assert [r["online_acc"] for r in again["scored"]] == [r["online_acc"] for r in streams["scored"]]


def test_ablation_command_writes_its_row_and_leaves_the_main_table_alone(tmp_path, capsys):
    """`--ablation NAME` runs the variant and full fine-tuning on every row (block-noise rows included),
    stores its row and prints the ablation table; the main job's table.md is not overwritten."""
    from benchmarks.offline.__main__ import main

    out = tmp_path / "offline"
    args = ["--quick", "--out", str(out), "--no-progress", "--workers", "1", "--ablation", "max_over_matrices"]
    assert main(args) == 0
    row = json.loads((out / "ablations" / "max_over_matrices.json").read_text())
    assert {"noise_layer1", "label_permutation", "blur"} <= set(row["rows"])
    assert row["options"] == {"max_over": "matrices"}
    assert "| `max_over_matrices` |" in (out / "ablations" / "table.md").read_text()
    assert "| `max_over_matrices` |" in capsys.readouterr().out
    assert not (out / "table.md").exists()


def test_noise_level_defaults_are_the_named_corruptions_and_scale_the_damage():
    x = data.sample(20, 3)["x"]
    for name, default in (("gaussian_noise", 0.35), ("impulse_noise", 0.2)):
        assert torch.equal(data.corrupt(x, name, 5), data.corrupt(x, name, 5, level=default))
        mild = (data.corrupt(x, name, 5, level=default / 4) - x).abs().mean()
        assert 0 < mild < 0.5 * (data.corrupt(x, name, 5) - x).abs().mean()
    with pytest.raises(ValueError, match="level applies to"):
        data.corrupt(x, "blur", 5, level=0.1)
