"""The offline unlabeled-stream experiment: predict before adapting, what each variant may change, the
batch-statistics baseline against a hand computation, MEMO against a slow loop over the fixed copies,
determinism with and without the shared cache, and an lr choice that never sees the scored stream."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from benchmarks.offline import stream as S
from benchmarks.offline.stream_report import stream_table
from benchmarks.offline.augment import augmented_copies
from benchmarks.offline.model import SmallResNet
from benchmarks.offline.shifts import SHIFTS
from surgical_optim import keep_norm_eval

CFG = S.StreamConfig(stream=40, batch=10, held_out=20, chunk=20, copies=2, lrs=(1e-2, 1e-3), channels_last=False)
CONTRAST = next(s for s in S.STREAM_SHIFTS if s.name == "contrast")
#: parameter-name prefixes of each block of the SmallResNet, written out by hand
BLOCK_PREFIXES = {
    "stem": ("conv1.", "bn1."), "layer1": ("layer1.",), "layer2": ("layer2.",), "layer3": ("layer3.",),
    "layer4": ("layer4.",), "fc": ("fc.",),
}
TUNED_PREFIXES = {
    **BLOCK_PREFIXES,
    "first": BLOCK_PREFIXES["stem"] + ("layer1.",),
    "first_two": BLOCK_PREFIXES["stem"] + ("layer1.", "layer2."),
    "all": tuple(itertools.chain(*BLOCK_PREFIXES.values())),
    "auto_rgn": tuple(itertools.chain(*BLOCK_PREFIXES.values())),
}
TIMINGS = ("wall_s", "cpu_s", "shared_cpu_s")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs small convolutions: one thread (conftest's ``one_thread``)."""


def tiny_model() -> SmallResNet:
    """A random SmallResNet, narrow for speed; the stem keeps 16 channels, so its output (16x32x32) is too
    large to store and the stem is rerun; BatchNorm gets non-trivial running statistics."""
    torch.manual_seed(0)
    model = SmallResNet(widths=(8, 8, 8, 8), stem=16)
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.2, 0.2)
            layer.running_var.uniform_(0.5, 2.0)
    return model.eval()


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def without_timings(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TIMINGS}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("variant", "loss"), [("all", "entropy"), ("layer2", "memo"), ("first", "memo")])
def test_each_batch_is_predicted_before_its_update(variant, loss, channels_last):
    model = tiny_model()
    cfg = S.StreamConfig(**{**CFG.to_dict(), "channels_last": channels_last})
    images, _ = S.stream_images(CONTRAST, 0, cfg)
    result = S.online_pass(model, CONTRAST, 0, variant, loss, 1e-2, cfg)
    with torch.no_grad():
        unadapted = model(images)
    torch.testing.assert_close(result.logits[: cfg.batch], unadapted[: cfg.batch], rtol=1e-4, atol=1e-5)
    # later batches are predicted by the adapted model: they differ from the unadapted predictions
    assert not torch.allclose(result.logits[cfg.batch :], unadapted[cfg.batch :], rtol=1e-4, atol=1e-5)


def test_none_is_plain_evaluation():
    model = tiny_model()
    images, labels = S.stream_images(CONTRAST, 0, CFG)
    with torch.no_grad():
        expected = (model(images).argmax(-1) == labels).double().mean().item()
    result = S.run_stream(model, CONTRAST, 0, "none", None, None, CFG)
    assert result["online_acc"] == pytest.approx(expected, abs=1e-12)


def batch_statistics_forward(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model with each BatchNorm's output replaced by a hand computation from its input's own batch
    statistics (mean and biased variance over batch, height and width)."""
    def by_hand(layer, inputs, _):
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        scale = layer.weight.view(1, -1, 1, 1) / torch.sqrt(var + layer.eps)
        return (x - mean) * scale + layer.bias.view(1, -1, 1, 1)

    reference = copy.deepcopy(model).eval()
    for layer in reference.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.register_forward_hook(by_hand)
    with torch.no_grad():
        return torch.cat([reference(batch) for batch in images.split(CFG.batch)])


def test_bn_stats_normalises_each_batch_with_its_own_statistics_and_tunes_nothing():
    model = tiny_model()
    before = state(model)
    images, _ = S.stream_images(CONTRAST, 0, CFG)
    result = S.online_pass(model, CONTRAST, 0, "bn_stats", None, None, CFG)
    torch.testing.assert_close(result.logits, batch_statistics_forward(model, images), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(result.logits, model(images), atol=1e-3)  # the running statistics are not used
    for name, parameter in result.model.named_parameters():
        assert torch.equal(parameter.detach(), before[name]), name
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())  # the source untouched


@pytest.mark.parametrize("variant", sorted(TUNED_PREFIXES))
def test_a_variant_changes_only_its_blocks_parameters_and_no_statistics(variant):
    model = tiny_model()
    before = state(model)
    adapted = S.online_pass(model, CONTRAST, 0, variant, "entropy", 1e-2, CFG).model
    prefixes = TUNED_PREFIXES[variant]
    parameters = dict(adapted.named_parameters())
    changed = {name for name, p in parameters.items() if not torch.equal(p.detach(), before[name])}
    assert changed and all(name.startswith(prefixes) for name in changed)
    for prefix in prefixes:  # every tuned block moved
        assert any(name.startswith(prefix) for name in changed), prefix
    for name, buffer in adapted.named_buffers():  # BatchNorm statistics stay the source's
        assert torch.equal(buffer, before[name]), name
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())  # the source untouched


def slow_memo(model, images, copies, prefixes, lr, batch):
    """MEMO by hand: for each batch, predict, then one Adam step on the entropy of the class distribution
    averaged over the batch's copies, each copy through the whole network."""
    reference = copy.deepcopy(model)
    keep_norm_eval(reference)
    reference.train()
    tuned = [p for name, p in reference.named_parameters() if name.startswith(prefixes)]
    for name, p in reference.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    optimizer = torch.optim.Adam(tuned, lr=lr)
    logits = []
    for start in range(0, len(images), batch):
        rows = slice(start, start + batch)
        with torch.no_grad():
            logits.append(reference(images[rows]))
        mean_p = torch.stack([torch.softmax(reference(c[rows]), -1) for c in copies]).mean(0)
        loss = -(mean_p * mean_p.log()).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.cat(logits), reference


@pytest.mark.parametrize("variant", ["layer2", "first"])
def test_memo_equals_a_slow_loop_over_the_fixed_copies(variant):
    model = tiny_model()
    images, _ = S.stream_images(CONTRAST, 0, CFG)
    copies = S.memo_copies(CONTRAST, 0, CFG)
    assert copies.shape == (CFG.copies, *images.shape)
    result = S.online_pass(model, CONTRAST, 0, variant, "memo", 1e-2, CFG)
    logits, reference = slow_memo(model, images, copies, TUNED_PREFIXES[variant], 1e-2, CFG.batch)
    torch.testing.assert_close(result.logits, logits, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(result.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_memo_copies_are_colour_symmetries_of_the_stream_images():
    images, _ = S.stream_images(CONTRAST, 0, CFG)
    copies = augmented_copies(images, 3, seed=5)
    assert torch.equal(copies, augmented_copies(images, 3, seed=5))
    assert not torch.equal(copies, augmented_copies(images, 3, seed=6))
    candidates = [v for p in itertools.permutations(range(3)) for v in (images[:, list(p)], 1 - images[:, list(p)])]
    for c in copies:
        matched = torch.stack([(c == v).flatten(1).all(1) for v in candidates]).any(0)
        assert matched.all()


def test_held_out_and_scored_streams_are_different_draws_of_the_same_shift():
    scored, _ = S.stream_images(CONTRAST, 0, CFG)
    held, _ = S.stream_images(CONTRAST, 0, CFG, held_out=True)
    other_seed, _ = S.stream_images(CONTRAST, 1, CFG)
    assert held.shape[0] == CFG.held_out and scored.shape[0] == CFG.stream
    for a, b in ((scored, held), (scored, other_seed)):
        assert torch.cdist(a.flatten(1), b.flatten(1)).min() > 1.0  # no image of one is in the other
    # both streams carry the shift: reduced contrast, a pixel spread far below the clean source's
    clean, _ = S.stream_images(next(s for s in SHIFTS if s.name == "label_permutation"), 0, CFG)
    assert held.std(dim=(1, 2, 3)).mean() < 0.5 * clean.std(dim=(1, 2, 3)).mean()
    assert scored.std(dim=(1, 2, 3)).mean() < 0.5 * clean.std(dim=(1, 2, 3)).mean()


def test_run_stream_is_deterministic_and_the_cache_changes_no_number():
    model = tiny_model()
    first = S.run_stream(model, CONTRAST, 0, "layer3", "memo", 1e-2, CFG)
    again = S.run_stream(model, CONTRAST, 0, "layer3", "memo", 1e-2, CFG)
    cache = S.StreamCache()
    S.run_stream(model, CONTRAST, 0, "layer1", "memo", 1e-2, CFG, cache=cache)  # the stream and its copies
    partly = S.run_stream(model, CONTRAST, 0, "layer3", "memo", 1e-2, CFG, cache=cache)  # adds their prefixes
    warm = S.run_stream(model, CONTRAST, 0, "layer3", "memo", 1e-2, CFG, cache=cache)
    assert without_timings(first) == without_timings(again) == without_timings(partly) == without_timings(warm)
    assert warm["shared_cpu_s"] == 0.0  # everything it shares came from the cache


def test_curve_reports_each_chunk_and_the_running_accuracy():
    correct = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.float64)
    curve = S._curve(correct, 2)
    assert curve == {"position": [2, 4, 6], "chunk_acc": [1.0, 0.0, 0.5], "cumulative_acc": [1.0, 0.5, 0.5]}


def test_a_held_out_run_draws_only_the_held_out_stream(monkeypatch):
    drawn = []
    sample = S.data.sample
    monkeypatch.setattr(S.data, "sample", lambda n, seed, **kw: drawn.append(seed) or sample(n, seed, **kw))
    S.run_stream(tiny_model(), CONTRAST, 3, "fc", "memo", 1e-2, CFG, held_out=True)
    assert drawn and set(drawn) == {S.stream_seed(3, held_out=True)} != {S.stream_seed(3, held_out=False)}


def held_out_result(variant, lr, acc, held_out=True):
    return {"shift": "contrast", "seed": 0, "variant": variant, "loss": "entropy", "lr": lr, "online_acc": acc,
            "held_out": held_out}


def test_choose_lr_takes_the_best_held_out_accuracy_and_refuses_scored_results():
    results = [held_out_result("all", 1e-3, 0.2), held_out_result("all", 1e-4, 0.7),
               held_out_result("fc", 1e-3, 0.6), held_out_result("fc", 1e-4, 0.6)]
    assert S.choose_lr(results) == {("contrast", 0, "all", "entropy"): 1e-4, ("contrast", 0, "fc", "entropy"): 1e-4}
    with pytest.raises(ValueError, match="held-out stream only"):
        S.choose_lr(results + [held_out_result("all", 1e-3, 0.9, held_out=False)])


def test_tasks_choose_on_held_out_then_score_at_the_chosen_lr():
    cfg = S.StreamConfig(**{**CFG.to_dict(), "variants": ("none", "bn_stats", "fc", "layer2"), "memo_variants": ("fc",)})
    held = S.stream_tasks([CONTRAST], [0, 1], cfg)
    assert {t.held_out for t in held} == {True}
    runs = {(t.variant, t.loss) for t in held}
    assert runs == {("fc", "entropy"), ("fc", "memo"), ("layer2", "entropy")}  # MEMO only where asked
    assert len(held) == 2 * len(runs) * len(cfg.lrs)  # seeds x runs x lrs
    chosen = {(t.shift.name, t.seed, t.variant, t.loss): 1e-3 if t.variant == "fc" else 1e-2 for t in held}
    scored = S.scored_tasks([CONTRAST], [0, 1], cfg, chosen)
    assert {t.held_out for t in scored} == {False}
    for task in scored:
        key = (task.shift.name, task.seed, task.variant, task.loss)
        assert task.lr == (None if task.variant in ("none", "bn_stats") else chosen[key])
    assert sum(t.variant == "none" for t in scored) == 2  # untuned: once per seed, whatever the loss


def scored_result(shift, seed, variant, loss, acc):
    return {"shift": shift, "kind": "input", "seed": seed, "variant": variant, "loss": loss, "lr": None,
            "online_acc": acc, "held_out": False}


def test_stream_table_reports_mean_and_standard_error_over_seeds():
    results = [scored_result("contrast", 0, "first", "memo", 0.5), scored_result("contrast", 1, "first", "memo", 0.7),
               scored_result("contrast", 0, "none", None, 0.4), scored_result("contrast", 1, "none", None, 0.4),
               held_out_result("first", 1e-3, 0.1)]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in stream_table(results).splitlines()
            if line.startswith("| ")}
    assert rows["first"][1] == "60.0 ± 10.0"  # mean 0.6, s.e. = std 0.1414 / sqrt 2 = 0.1
    assert rows["first"][-1].strip(" |") == "75.4"  # the paper's "layer 1" beside it
    assert rows["none"][1] == "40.0 ± 0.0"


def test_stream_shifts_cover_every_input_level_shift_and_the_contrasting_kinds():
    names = [s.name for s in S.STREAM_SHIFTS]
    assert [s.name for s in SHIFTS if s.kind == "input"] == names[:4]
    assert {"gaussian_noise_mild", "impulse_noise_mild", "unseen_styles", "label_permutation", "spurious_flip"} <= set(names)
    mild, _ = S.stream_images(S.STREAM_SHIFTS[names.index("gaussian_noise_mild")], 0, CFG)
    harsh, _ = S.stream_images(S.STREAM_SHIFTS[names.index("gaussian_noise")], 0, CFG)
    clean, _ = S.stream_images(S.STREAM_SHIFTS[names.index("label_permutation")], 0, CFG)
    assert 0 < (mild - clean).abs().mean() < 0.6 * (harsh - clean).abs().mean()  # the same images, less noise


def test_stream_table_leaves_out_variants_a_loss_did_not_run():
    """MEMO runs on the paper's rows only: a variant with entropy results but none under MEMO has no
    (all-dash) row in the MEMO table."""
    results = [scored_result("contrast", 0, "layer2", "entropy", 0.5), scored_result("contrast", 0, "first", "memo", 0.6),
               scored_result("contrast", 0, "none", None, 0.4)]
    tables = stream_table(results).split("**memo**")
    assert "| layer2 |" in tables[0] and "| layer2 |" not in tables[1]
    assert "| first |" in tables[1] and "| none |" in tables[1]
