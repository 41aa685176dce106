"""The shared fine-tuning protocol (benchmarks/protocol.py): small, fast, CPU-only checks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.protocol import (
    Method,
    PrefixCache,
    ProtocolConfig,
    available_methods,
    evaluate,
    finetune,
    make_method,
    register_method,
    split_stages,
)
from surgical_optim import select_blocks


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


def test_none_evaluates_without_training():
    m = _model()
    train, val, test = _data(48, 1), _data(24, 2), _data(30, 3)
    r = finetune(m, "none", train, val, test, config=CFG)
    direct = evaluate(m, test)
    assert r.lr is None and r.epoch == 0
    assert r.test_acc == pytest.approx(direct.acc)


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
    m = _model()
    r = finetune(m, "fc", _data(48, 1), _data(24, 2), _data(30, 3, groups=True), config=CFG)
    assert r.worst_group_acc is not None
    assert set(r.group_accs) == {"0", "1"}
    assert r.worst_group_acc == pytest.approx(min(r.group_accs.values()))
    json.dumps(r.to_dict())


def test_dataloader_and_dataset_inputs():
    m = _model()
    xtr, ytr = _data(48, 1)
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = TensorDataset(*_data(24, 2))
    test = TensorDataset(*_data(30, 3, groups=True))
    r = finetune(m, "layer4", loader, val, test, config=CFG)
    assert r.precomputed_prefix == 0  # no precompute for loaders under "auto"
    assert 0.0 <= r.test_acc <= 1.0 and r.worst_group_acc is not None


def test_auto_methods_and_diagnostics():
    m = _model()
    data = (_data(48, 1), _data(24, 2), _data(30, 3))
    cfg = ProtocolConfig(lrs=(1e-2,), epochs=3, batch_size=16, method_options={"auto_snr": {"threshold": 0.5, "samples": 2}})
    r = finetune(m, "auto_rgn", *data, config=cfg)
    mult = r.diagnostics["0.01"]["block_multipliers"]
    assert list(mult) == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert all(0.0 <= v <= 1.0 for v in mult.values())
    s = finetune(m, "auto_snr", *data, config=cfg)
    frac = s.diagnostics["0.01"]["trained_fraction"]
    assert all(0.0 <= v <= 1.0 for v in frac.values())
    json.dumps(r.to_dict())
    json.dumps(s.to_dict())


@pytest.mark.parametrize("name", ["gradual_last_first", "gradual_first_last", "l1_sp"])
def test_extra_methods_run(name):
    m = _model()
    r = finetune(m, name, _data(48, 1), _data(24, 2), _data(30, 3), config=CFG)
    assert 0.0 <= r.test_acc <= 1.0


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
