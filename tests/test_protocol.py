"""The shared fine-tuning protocol (benchmarks/protocol.py): small, fast, CPU-only checks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from benchmarks.protocol import (
    AutoSNRMethod,
    GradualUnfreezing,
    Method,
    PrefixCache,
    ProtocolConfig,
    available_methods,
    evaluate,
    finetune,
    make_method,
    method_names,
    register_method,
    split_stages,
)
from surgical_optim import param_groups_by_block, select_blocks


class TinyResNetLike(nn.Module):
    """torchvision-ResNet attribute layout, tiny."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _data(n: int, seed: int, classes: int = 3, groups: bool = False):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    x[:, 0] += y.view(-1, 1, 1).float()  # learnable signal
    if groups:
        return x, y, (torch.arange(n) % 2)
    return x, y


def _model(seed: int = 0) -> TinyResNetLike:
    torch.manual_seed(seed)
    m = TinyResNetLike()
    # give BatchNorm non-trivial running statistics, then freeze them (eval mode in the protocol)
    m.train()
    with torch.no_grad():
        m(torch.randn(64, 3, 8, 8) * 2 + 1)
    return m.eval()


pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ProtocolConfig(lrs=(1e-2, 1e-3), epochs=3, batch_size=16)


def test_split_stages_compose_to_model():
    m = _model()
    stages = split_stages(m)
    assert [n for n, _ in stages] == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    x = torch.randn(5, 3, 8, 8)
    out = x
    for _, s in stages:
        out = s(out)
    torch.testing.assert_close(out, m(x))


def test_split_stages_none_for_unknown_layout():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert split_stages(m) is not None  # children are the blocks
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    assert split_stages(Odd()) is None


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return int((model.eval()(x).argmax(1) == y).sum()) / len(y)


def test_none_evaluates_without_training():
    m = _model()
    train, val, test = _data(48, 1), _data(24, 2), _data(30, 3)
    r = finetune(m, "none", train, val, test, config=CFG)
    assert r.lr is None and r.epoch == 0
    assert r.test_acc == _accuracy(m, *test) and r.val_acc == _accuracy(m, *val)
    assert evaluate(m, test).acc == r.test_acc


def test_model_is_not_modified_and_bn_stats_frozen():
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = finetune(m, "all", _data(48, 1), _data(24, 2), _data(30, 3), config=CFG, return_state=True)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # running statistics are buffers: BN in eval mode leaves them as they were
    assert r.state is not None
    torch.testing.assert_close(r.state["bn1.running_mean"], before["bn1.running_mean"])
    torch.testing.assert_close(r.state["layer1.1.running_var"], before["layer1.1.running_var"])
    assert m.training is False


@pytest.mark.parametrize("block", ["stem", "layer2", "fc"])
def test_block_method_changes_only_its_block(block):
    m = _model()
    r = finetune(m, block, _data(48, 1), _data(24, 2), _data(30, 3), config=CFG, return_state=True)
    chosen = {id(p) for g in select_blocks(m, block) for p in g["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in chosen}
    for p in m.parameters():
        p.requires_grad_(True)
    before = m.state_dict()
    changed = {k for k, v in r.state.items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    assert changed <= names, changed - names


def test_prefix_precompute_matches_plain_training():
    """Precomputing the frozen prefix is exact: same selection and test accuracy, same weights."""
    m = _model()
    data = (_data(48, 1), _data(24, 2), _data(30, 3))
    fast = finetune(m, "layer3", *data, config=CFG, return_state=True)
    slow_cfg = ProtocolConfig(lrs=CFG.lrs, epochs=CFG.epochs, batch_size=CFG.batch_size, precompute_prefix=False)
    slow = finetune(m, "layer3", *data, config=slow_cfg, return_state=True)
    assert fast.precomputed_prefix == 3 and slow.precomputed_prefix == 0
    assert (fast.lr, fast.epoch) == (slow.lr, slow.epoch)
    assert fast.test_acc == pytest.approx(slow.test_acc)
    for k in fast.state:
        torch.testing.assert_close(fast.state[k], slow.state[k], atol=1e-5, rtol=1e-4)


def test_explicit_stages_train_the_copy_not_the_callers_model():
    """Explicit stages name the caller's modules; the protocol must map them onto its own copy."""
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    data = (_data(48, 1), _data(24, 2), _data(30, 3))
    stages = split_stages(m)
    explicit = finetune(m, "layer3", *data, config=CFG, stages=stages, return_state=True)
    automatic = finetune(m, "layer3", *data, config=CFG, return_state=True)
    assert explicit.precomputed_prefix == 3
    assert all(p.grad is None for p in m.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(explicit.state["layer3.0.weight"], before["layer3.0.weight"])
    for k in automatic.state:
        torch.testing.assert_close(explicit.state[k], automatic.state[k], atol=1e-5, rtol=1e-4)


def test_shared_prefix_cache_reused():
    m = _model()
    cache = PrefixCache()
    data = (_data(48, 1), _data(24, 2), _data(30, 3))
    finetune(m, "layer4", *data, config=CFG, prefix_cache=cache, data_key="d")
    n = len(cache._store)
    assert n == 3  # train, val, test at depth 4
    finetune(m, "fc", *data, config=CFG, prefix_cache=cache, data_key="d")
    assert len(cache._store) == 6
    with pytest.raises(ValueError):
        finetune(m, "fc", *data, config=CFG, prefix_cache=cache)  # shared cache without a key


def test_selection_is_by_validation_and_deterministic():
    m = _model()
    data = (_data(48, 1), _data(24, 2), _data(30, 3))
    a = finetune(m, "all", *data, config=CFG, seed=3)
    b = finetune(m, "all", *data, config=CFG, seed=3)
    assert a.to_dict()["val_curves"] == b.to_dict()["val_curves"]
    assert a.test_acc == b.test_acc
    best_val = max(v for curve in a.val_curves.values() for v in curve)
    assert a.val_acc == pytest.approx(best_val)
    assert a.val_curves[str(a.lr)][a.epoch - 1] == pytest.approx(a.val_acc)


def test_worst_group_accuracy_reported_and_json():
    """Test accuracy per group, measured here with the selected weights, is what the result reports."""
    m = _model()
    x, y = _data(30, 3)
    g = (y == 0).long()  # groups tied to a class, so that their accuracies differ
    r = finetune(m, "fc", _data(48, 1), _data(24, 2), (x, y, g), config=CFG, return_state=True)
    tuned = _model()
    tuned.load_state_dict(r.state)
    by_group = {str(k): _accuracy(tuned, x[g == k], y[g == k]) for k in (0, 1)}
    assert r.group_accs == pytest.approx(by_group, abs=1e-12)
    assert r.worst_group_acc == pytest.approx(min(by_group.values()), abs=1e-12)
    assert r.test_acc == pytest.approx(_accuracy(tuned, x, y), abs=1e-12)
    assert by_group["0"] != by_group["1"]  # the groups differ here, so the worst one is a real choice
    json.dumps(r.to_dict())


class _SameOrderAsTensors(Sampler):
    """One permutation per epoch from a generator seeded once with ``seed``: the order in which the protocol
    draws tensor data for a single learning rate, so a loader with this sampler yields the same batches."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("train_form", ["loader", "dataset"])
def test_dataloader_and_dataset_inputs_train_like_tensors(train_form):
    """The same batches as a DataLoader (or the same data as a Dataset) give the same numbers as tensors."""
    m = _model()
    train, val, test = _data(48, 1), _data(24, 2), _data(30, 3, groups=True)
    cfg = ProtocolConfig(lrs=(1e-2,), epochs=3, batch_size=16, precompute_prefix=False)
    ref = finetune(m, "layer3", train, val, test, config=cfg, seed=5, return_state=True)
    if train_form == "loader":
        train_in = DataLoader(TensorDataset(*train), batch_size=16, sampler=_SameOrderAsTensors(48, seed=5))
    else:
        train_in = TensorDataset(*train)
    auto = ProtocolConfig(lrs=(1e-2,), epochs=3, batch_size=16)  # "auto": no prefix precompute for these
    got = finetune(m, "layer3", train_in, TensorDataset(*val), TensorDataset(*test), config=auto, seed=5,
                   return_state=True)
    assert got.precomputed_prefix == 0
    assert got.val_curves == ref.val_curves and (got.lr, got.epoch) == (ref.lr, ref.epoch)
    assert got.test_acc == ref.test_acc and got.group_accs == ref.group_accs
    assert got.worst_group_acc == ref.worst_group_acc is not None
    assert got.val_loss == pytest.approx(ref.val_loss, rel=1e-6)  # evaluation batches differ: float order
    changed = [k for k in ref.state if not torch.equal(ref.state[k], m.state_dict()[k])]
    assert changed and all(k.startswith("layer3.") for k in changed)  # something trained, the right block
    for k in ref.state:
        assert torch.equal(got.state[k], ref.state[k]), k


def _block_of(model: nn.Module) -> dict[str, str]:
    """Parameter name -> block name (the library's default split)."""
    block = {id(p): g["name"] for g in param_groups_by_block(model, trainable_only=False) for p in g["params"]}
    return {n: block[id(p)] for n, p in model.named_parameters()}


def test_auto_rgn_scales_each_tensors_step_by_the_multiplier_it_reports():
    """One Adam step: a tensor's step under Auto-RGN is its multiplier times its step under plain full
    fine-tuning (the first Adam step is linear in the lr), so the observed ratios are the multipliers."""
    m = _model()
    data = (_data(48, 1), _data(24, 2), _data(30, 3))
    cfg = ProtocolConfig(lrs=(1e-2,), epochs=1, batch_size=48)  # one epoch of one batch: one step
    plain = finetune(m, "all", *data, config=cfg, return_state=True)
    rgn = finetune(m, "auto_rgn", *data, config=cfg, return_state=True)
    source = {n: p.detach() for n, p in m.named_parameters()}
    ratio = {n: float((rgn.state[n] - p).norm() / (plain.state[n] - p).norm()) for n, p in source.items()}
    assert all(0.0 <= r <= 1.0 + 1e-4 for r in ratio.values()), ratio
    assert max(ratio.values()) == pytest.approx(1.0, abs=1e-4)  # the largest RGN trains at the full lr
    assert min(ratio.values()) < 0.1  # and others far slower: not the plain path
    reported = rgn.diagnostics["0.01"]["block_multipliers"]
    block = _block_of(m)
    assert list(reported) == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    for name, value in reported.items():
        observed = [r for n, r in ratio.items() if block[n] == name]
        assert value == pytest.approx(sum(observed) / len(observed), rel=1e-3, abs=1e-5), name


class _AutoSNRWatched(AutoSNRMethod):
    """Auto-SNR that also records its mask and which tensors moved once the mask was in force."""

    def __init__(self, log: list, **options) -> None:
        super().__init__(**options)
        self.log = log

    def setup(self, model, lr, config, make_optimizer):
        self.model = model
        return super().setup(model, lr, config, make_optimizer)

    def after_step(self, model, optimizer, step):
        if step == self.options["samples"]:  # the mask is estimated now and applies from the next step
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def diagnostics(self):
        moved = {n for n, p in self.model.named_parameters() if not torch.equal(p, self.before[n])}
        kept = self._opt.mask().tolist()
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        names = [by_id[id(p)] for g in self._opt.param_groups for p in g["params"]]
        self.log.append({"moved": moved, "kept": {n for n, k in zip(names, kept) if k}})
        return super().diagnostics()


def test_auto_snr_trains_exactly_the_tensors_its_mask_keeps():
    m = _model()
    log: list = []
    cfg = ProtocolConfig(lrs=(1e-2,), epochs=3, batch_size=16)
    r = finetune(m, lambda: _AutoSNRWatched(log, threshold=0.5, samples=2), _data(48, 1), _data(24, 2),
                 _data(30, 3), config=cfg)
    (seen,) = log
    names = {n for n, _ in m.named_parameters()}
    assert seen["moved"] == seen["kept"]  # after the estimate, the frozen tensors stay where they were
    assert 0 < len(seen["kept"]) < len(names)  # and the threshold froze some, not all
    block = _block_of(m)
    fractions = r.diagnostics["0.01"]["trained_tensor_fraction"]
    for name, fraction in fractions.items():  # the reported fractions are those of the tensors that moved
        members = [n for n in names if block[n] == name]
        assert fraction == pytest.approx(sum(n in seen["moved"] for n in members) / len(members)), name
    assert min(fractions.values()) < 1.0


class _GradualWatched(GradualUnfreezing):
    """Gradual unfreezing that records, per epoch, the blocks that may train and the blocks that moved."""

    def __init__(self, direction: str, log: list) -> None:
        super().__init__(direction)
        self.log = log

    def on_epoch_start(self, model, optimizer, epoch, epochs):
        self._close_epoch()
        super().on_epoch_start(model, optimizer, epoch, epochs)
        trainable = [g["name"] for g in self._groups if all(p.requires_grad for p in g["params"])]
        self.log.append({"trainable": trainable})
        self.before = [[p.detach().clone() for p in g["params"]] for g in self._groups]

    def _close_epoch(self) -> None:
        if self.log and "moved" not in self.log[-1]:
            self.log[-1]["moved"] = [g["name"] for g, old in zip(self._groups, self.before)
                                     if any(not torch.equal(p, q) for p, q in zip(g["params"], old))]

    def diagnostics(self):
        self._close_epoch()
        return super().diagnostics()


@pytest.mark.parametrize("direction", ["last_first", "first_last"])
def test_gradual_unfreezing_adds_a_block_on_the_scheduled_epochs(direction):
    """6 blocks over 7 epochs: one more block every ceil(7 / 6) = 2 epochs, and only those blocks move."""
    m = _model()
    log: list = []
    cfg = ProtocolConfig(lrs=(1e-2,), epochs=7, batch_size=16)
    finetune(m, lambda: _GradualWatched(direction, log), _data(48, 1), _data(24, 2), _data(30, 3), config=cfg)
    blocks = ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    counts = [1, 1, 2, 2, 3, 3, 4]
    want = [blocks[-k:] if direction == "last_first" else blocks[:k] for k in counts]
    assert [e["trainable"] for e in log] == want
    assert [e["moved"] for e in log] == want


def test_l1_sp_pulls_the_weights_towards_the_source():
    """With strength 0, L1-SP is full fine-tuning to the bit; with a penalty, the fine-tuned weights stay
    much closer to the source weights (Adam takes sign-like steps, so any strength that dominates the small
    gradients holds those weights near the source)."""
    m = _model()
    data = (_data(48, 1), _data(24, 2), _data(30, 3))
    source = {n: p.detach() for n, p in m.named_parameters()}

    def tuned(method: str, strength: float = 0.0):
        cfg = ProtocolConfig(lrs=(1e-2,), epochs=1, batch_size=8, method_options={"l1_sp": {"strength": strength}})
        return finetune(m, method, *data, config=cfg, return_state=True).state  # one epoch: the last state

    def distance(state) -> float:
        return float(sum((state[n] - p).abs().sum() for n, p in source.items()))

    full = tuned("all")
    unpenalised = tuned("l1_sp", 0.0)
    for k in full:
        assert torch.equal(unpenalised[k], full[k]), k
    for strength in (1e-2, 1.0):
        assert distance(tuned("l1_sp", strength)) < 0.5 * distance(full), strength


def test_register_custom_method_and_errors():
    class HeadOnlySGD(Method):
        name = "head_sgd"

        def first_trainable_block(self, names):
            return len(names) - 1

        def setup(self, model, lr, config, make_optimizer):
            groups = select_blocks(model, "last")
            return torch.optim.SGD(groups, lr=lr)

    register_method("head_sgd", HeadOnlySGD)
    m = _model()
    assert "head_sgd" in available_methods(m) and "layer2" in available_methods(m)
    r = finetune(m, "head_sgd", _data(48, 1), _data(24, 2), _data(30, 3), config=CFG)
    assert r.precomputed_prefix == 5
    with pytest.raises(KeyError):
        make_method("nope", m, CFG)
    with pytest.raises(TypeError):
        finetune(m, "all", [1, 2], _data(24, 2), _data(30, 3), config=CFG)


def test_custom_optimizer_factory_and_divergence():
    m = _model()
    calls = []

    def sgd(groups, lr, wd):
        calls.append(lr)
        return torch.optim.SGD(groups, lr=lr, weight_decay=wd)

    cfg = ProtocolConfig(lrs=(1e6, 1e-2), epochs=2, batch_size=16, optimizer=sgd)
    r = finetune(m, "all", _data(48, 1), _data(24, 2), _data(30, 3), config=cfg)
    assert calls == [1e6, 1e-2]
    assert r.lr == 1e-2  # the diverging lr is never selected
    json.dumps(r.to_dict())


def _stem_with_layer1(name: str) -> str:
    """A split like the paper's: the stem tunes together with layer1."""
    top = name.split(".", 1)[0]
    return "layer1" if top in ("conv1", "bn1") else top


def test_the_block_split_is_an_input():
    """With a matcher, methods and stages follow that split: 'layer1' trains the stem too, the stages are
    one per block of the split, and the frozen prefix counts blocks of the split."""
    m = _model()
    stages = split_stages(m, _stem_with_layer1)
    assert [n for n, _ in stages] == ["layer1", "layer2", "layer3", "layer4", "fc"]
    cfg = ProtocolConfig(lrs=(1e-2,), epochs=2, batch_size=16, blocks=_stem_with_layer1)
    data = (_data(48, 1), _data(24, 2), _data(30, 3))
    r = finetune(m, "layer1", *data, config=cfg, return_state=True)
    before = m.state_dict()
    changed = {k for k, v in r.state.items() if not torch.equal(v, before[k])}
    assert "conv1.weight" in changed and "layer1.0.weight" in changed
    assert all(k.split(".")[0] in ("conv1", "bn1", "layer1") for k in changed), changed
    assert r.precomputed_prefix == 0
    fc = finetune(m, "block:fc", *data, config=cfg)
    assert fc.precomputed_prefix == 4  # the five blocks of this split, all but fc
    with pytest.raises(KeyError):
        make_method("block:stem", m, cfg)  # no such block in this split


def test_method_names_one_parser():
    blocks = ["stem", "layer1", "fc"]
    assert method_names(["full", "block:*", "last", "linear_probe", "gu_last_first"], blocks) == [
        "all", "block:stem", "block:layer1", "block:fc", "gradual_last_first"]
    for bad in ("bogus", "block:nope"):
        with pytest.raises(KeyError):
            method_names([bad], blocks)


class _ReadsAhead(Method):
    """``inner``'s training, but reading (and differentiating) the epoch's first ``ahead`` training losses at
    every epoch start, as a method that sizes its optimizer from them does."""

    def __init__(self, inner: Method, ahead: int) -> None:
        self.inner, self.ahead, self.name = inner, ahead, inner.name

    def setup(self, model, lr, config, make_optimizer):
        return self.inner.setup(model, lr, config, make_optimizer)

    def epoch_optimizer(self, model, optimizer, epoch, epochs, losses):
        for loss in losses(self.ahead):
            loss.backward()
        for p in model.parameters():
            p.grad = None
        return optimizer


@pytest.mark.parametrize("method", ["all", "layer3"])
def test_reading_the_epochs_first_losses_changes_no_batch(method):
    """Reading ahead takes the epoch's own first batches (through the precomputed prefix for layer3): the
    training batches, their order and so every number are those of the method that does not look."""
    m = _model()
    data = (_data(48, 1), _data(24, 2), _data(30, 3))
    plain = finetune(m, method, *data, config=CFG, seed=2, return_state=True)
    looked = finetune(m, lambda: _ReadsAhead(make_method(method, m, CFG), 2), *data, config=CFG, seed=2,
                      return_state=True)
    assert looked.precomputed_prefix == plain.precomputed_prefix == (3 if method == "layer3" else 0)
    assert looked.val_curves == plain.val_curves and (looked.lr, looked.epoch) == (plain.lr, plain.epoch)
    for k in plain.state:
        assert torch.equal(looked.state[k], plain.state[k]), k


def test_epoch_losses_are_the_first_training_batches():
    """losses(n) gives the loss of the epoch's first n batches in training order (one permutation per epoch
    from a generator seeded with the run seed), with the weights the previous epoch left."""
    seen: list[list[float]] = []

    class Records(Method):
        name = "records"

        def setup(self, model, lr, config, make_optimizer):
            return make_optimizer(select_blocks(model, "fc"))

        def epoch_optimizer(self, model, optimizer, epoch, epochs, losses):
            with torch.no_grad():
                seen.append([float(loss) for loss in losses(10)])  # more than there are: all 3
            self.model = model
            return optimizer

    m = _model()
    (x, y), cfg = _data(48, 1), ProtocolConfig(lrs=(0.0,), epochs=2, batch_size=16)  # lr 0: weights stay
    finetune(m, Records, (x, y), _data(24, 2), _data(30, 3), config=cfg, seed=7)
    gen = torch.Generator().manual_seed(7)
    for epoch_losses in seen:
        order = torch.randperm(48, generator=gen)
        with torch.no_grad():
            want = [float(nn.functional.cross_entropy(m(x[order[i:i + 16]]), y[order[i:i + 16]]))
                    for i in range(0, 48, 16)]
        assert epoch_losses == pytest.approx(want, rel=1e-5)
    assert len(seen) == 2


def _offers(monkeypatch) -> list[tuple[float, int, float, float]]:
    """(lr, epoch, val acc, val loss) of every epoch the protocol offers to its selection, in order."""
    from benchmarks.protocol import loop

    log: list = []
    real = loop._Selection.offer

    def offer(self, lr, epoch, val, model):
        log.append((lr, epoch, val.acc, val.loss))
        return real(self, lr, epoch, val, model)

    monkeypatch.setattr(loop._Selection, "offer", offer)
    return log


def test_patience_that_never_triggers_changes_nothing():
    m = _model()
    data = (_data(48, 1), _data(24, 2), _data(30, 3))
    full = finetune(m, "all", *data, config=CFG, seed=1).to_dict()
    patient = finetune(m, "all", *data, config=ProtocolConfig(lrs=CFG.lrs, epochs=3, batch_size=16, patience=3),
                       seed=1).to_dict()
    for d in (full, patient):
        d.pop("seconds")
    assert patient == full
    assert full["epochs_run"] == {"0.01": 3, "0.001": 3} and full["steps"] == {"0.01": 9, "0.001": 9}


def test_patience_stops_each_lr_and_selects_as_the_full_run_over_the_epochs_run(monkeypatch):
    """The full run's per-epoch validation accuracies say where patience 1 must stop each lr (the first epoch
    whose accuracy is not above that lr's best so far: a tie with a lower loss is no progress); the stopped
    run must select the full run's best (accuracy, then lower loss) over those epochs."""
    m = _model()
    data = (_data(48, 1), _data(24, 2), _data(30, 3))
    cfg = dict(lrs=(3e-2, 1e-2, 1e-3), epochs=6, batch_size=16)
    log = _offers(monkeypatch)
    full = finetune(m, "all", *data, config=ProtocolConfig(**cfg), seed=1)
    kept = []
    for lr in cfg["lrs"]:
        best = None
        for entry in (e for e in log if e[0] == lr):
            kept.append(entry)
            key = entry[2]
            if best is not None and key <= best:
                break  # patience 1: the first epoch without a new best is the last one run
            best = key
    log.clear()
    stopped = finetune(m, "all", *data, config=ProtocolConfig(**cfg, patience=1), seed=1)
    assert log == kept  # the same epochs, the same numbers, up to the stop
    assert sum(stopped.epochs_run.values()) < sum(full.epochs_run.values())  # it did stop early somewhere
    want = max(kept, key=lambda e: (e[2], -e[3], -kept.index(e)))
    assert (stopped.lr, stopped.epoch, stopped.val_acc) == (want[0], want[1], want[2])
    for lr in cfg["lrs"]:
        run = sum(1 for e in kept if e[0] == lr)
        assert stopped.epochs_run[str(lr)] == len(stopped.val_curves[str(lr)]) == run
        assert stopped.steps[str(lr)] == 3 * run  # 48 examples in batches of 16
    with pytest.raises(ValueError):
        ProtocolConfig(patience=0)


def test_config_identity_unchanged_without_patience():
    """Runs are identified by a hash of ``to_dict()``: without patience it has exactly the keys it had before
    patience existed, with patience the key joins."""
    before = {"lrs", "epochs", "batch_size", "weight_decay", "optimizer", "bn_eval", "precompute_prefix",
              "eval_batch_size", "channels_last", "device", "method_options", "min_last_batch", "stop_on_nonfinite"}
    assert set(ProtocolConfig().to_dict()) == before
    assert ProtocolConfig(patience=4).to_dict()["patience"] == 4


def test_new_method_names_are_read_by_the_one_parser():
    assert method_names(["auto_select", "auto_rgn_paper"], ["stem", "fc"]) == ["auto_select", "auto_rgn_paper"]
    assert {"auto_select", "auto_rgn_paper"} <= set(available_methods())
    with pytest.raises(ValueError, match="select_method"):
        make_method("auto_select", _model(), CFG)
