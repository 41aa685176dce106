"""AutoRGN against slow references, edge cases and invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from surgical_optim import AutoRGN
from surgical_optim.auto_rgn_reference import ReferenceAutoRGN, per_tensor_lr_step, reference_multipliers

# Optimizers whose update is linear in the learning rate given their state.
OPTIMIZERS = {
    "sgd_momentum_wd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-2),
    "sgd_nesterov": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, weight_decay=1e-4),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=1e-2),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr, momentum=0.5, weight_decay=1e-3),
    "adagrad": lambda params, lr: torch.optim.Adagrad(params, lr=lr, weight_decay=1e-3),
}


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 3),
    ).to(dtype)


def batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def backward(model, x, y):
    torch.nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_matches_per_tensor_loop_reference(name, foreach):
    fast_model, ref_model = make_model(), make_model()
    make = OPTIMIZERS[name]
    fast_inner = make(fast_model.parameters(), 0.05)
    fast_inner.param_groups[0]["foreach"] = foreach
    fast = AutoRGN(fast_inner)
    ref = ReferenceAutoRGN(make(ref_model.parameters(), 0.05))
    for x, y in batches(5):
        for model, opt in ((fast_model, fast), (ref_model, ref.optimizer)):
            opt.zero_grad()
            backward(model, x, y)
        fast.step()
        ref.step()
        torch.testing.assert_close(fast.multipliers(), torch.tensor(ref.last_multipliers, dtype=torch.float64), rtol=1e-12, atol=1e-14)
        for a, b in zip(fast_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    # the inner optimizer state advanced identically
    for a, b in zip(fast_model.parameters(), ref_model.parameters()):
        for key, value in fast.state[a].items():
            if torch.is_tensor(value):
                torch.testing.assert_close(value, ref.optimizer.state[b][key], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("update", ["scaled_step", "auto"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_equals_one_param_group_per_tensor_with_scaled_lr(name, update):
    """The paper's formulation (lr x multiplier per tensor) gives the same trajectory, whether the
    multipliers scale the inner step afterwards or are folded into the update as a per-tensor lr (SGD, Adam, AdamW)."""
    fast_model, ref_model = make_model(), make_model()
    make = OPTIMIZERS[name]
    fast = AutoRGN(make(fast_model.parameters(), 0.05), update=update)
    ref_params = list(ref_model.parameters())
    ref = make([{"params": [p]} for p in ref_params], 0.05)
    for x, y in batches(5):
        fast.zero_grad()
        backward(fast_model, x, y)
        fast.step()
        ref.zero_grad()
        backward(ref_model, x, y)
        per_tensor_lr_step(ref, ref_params, 0.05)
        for a, b in zip(fast_model.parameters(), ref_params):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert fast.last_step_folded == (update == "auto" and name.startswith(("sgd", "adam")))


def test_multiplier_values_by_hand():
    a = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # |a| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))  # |b| = 1
    opt = AutoRGN(torch.optim.SGD([a, b], lr=1.0))
    a.grad = torch.tensor([0.0, 1.0])  # rgn 0.2
    b.grad = torch.tensor([0.1])  # rgn 0.1
    opt.step()
    torch.testing.assert_close(opt.multipliers(), torch.tensor([1.0, 0.5]))
    # effective lr 1.0 for a and 0.5 for b
    torch.testing.assert_close(a.detach(), torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(b.detach(), torch.tensor([0.95]))


@pytest.mark.parametrize("update", ["scaled_step", "per_tensor_lr"])
def test_single_tensor_is_identical_to_bare_optimizer(update):
    """Multiplier 1: lerp with weight 0 is exact (snapshot); folded, the CPU's host step sizes are
    torch's own arithmetic. A 64 x 32 tensor: small ones can agree by luck where arithmetic differs."""
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(64, 32))
    w2 = torch.nn.Parameter(w1.detach().clone())
    wrapped = AutoRGN(torch.optim.AdamW([w1], lr=1e-2, weight_decay=0.1), update=update)
    bare = torch.optim.AdamW([w2], lr=1e-2, weight_decay=0.1)
    for step in range(5):
        g = torch.randn(64, 32)
        w1.grad, w2.grad = g.clone(), g.clone()
        wrapped.step()
        bare.step()
        assert torch.equal(w1, w2), step  # bit-identical
    assert wrapped.last_step_folded == (update == "per_tensor_lr")


def test_zero_weight_tensor_gets_one_and_does_not_squash_others():
    zero = torch.nn.Parameter(torch.zeros(3))  # a zero-initialised head
    w = torch.nn.Parameter(torch.ones(4))
    v = torch.nn.Parameter(torch.ones(4))
    opt = AutoRGN(torch.optim.SGD([zero, w, v], lr=0.1))
    zero.grad = torch.ones(3)
    w.grad = torch.full((4,), 0.5)
    v.grad = torch.full((4,), 0.25)
    opt.step()
    torch.testing.assert_close(opt.multipliers(), torch.tensor([1.0, 1.0, 0.5]))
    assert torch.all(zero != 0)  # it learns
    # zero weight and zero gradient: nothing to do, multiplier 0
    zero2 = torch.nn.Parameter(torch.zeros(3))
    opt2 = AutoRGN(torch.optim.SGD([zero2, w], lr=0.1))
    zero2.grad = torch.zeros(3)
    w.grad = torch.ones(4)
    opt2.step()
    torch.testing.assert_close(opt2.multipliers(), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_non_finite_gradient_never_corrupts_parameters(bad, inner, both_paths):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(3))
    make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1)) if inner == "sgd" else (
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1)
    )
    opt = AutoRGN(make([a, b]))
    a_before = a.detach().clone()
    a.grad = torch.tensor([1.0, bad, 0.0, 1.0, 1.0])
    b.grad = torch.randn(3)
    opt.step()
    m = opt.multipliers()
    assert torch.isfinite(m).all() and (m >= 0).all() and (m <= 1).all()
    assert m[0] == 0 and m[1] == 1
    assert torch.equal(a.detach(), a_before)  # restored bit-exactly
    for value in opt.state[a].values():
        if torch.is_tensor(value):
            assert torch.isfinite(value).all()  # the optimizer state stays usable
    # training continues normally afterwards
    a.grad, b.grad = torch.randn(5), torch.randn(3)
    opt.step()
    assert torch.isfinite(a).all() and not torch.equal(a.detach(), a_before)


def test_all_zero_gradients_give_zero_multipliers():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = AutoRGN(torch.optim.SGD([a, b], lr=0.1))
    a.grad, b.grad = torch.zeros(2), torch.zeros(2)
    opt.step()
    assert torch.equal(opt.multipliers(), torch.zeros(2))


def test_tensors_without_grad_are_skipped_and_report_zero():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = AutoRGN(torch.optim.SGD([a, b], lr=0.1, momentum=0.9))
    a.grad = torch.ones(2)
    opt.step()
    assert opt.multipliers().tolist() == [1.0, 0.0]
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state


finite_or_not = st.one_of(
    st.floats(min_value=-1e30, max_value=1e30, allow_nan=False),
    st.sampled_from([0.0, float("nan"), float("inf"), -float("inf"), 1e-45, 1e38]),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(finite_or_not, min_size=1, max_size=4), st.lists(finite_or_not, min_size=1, max_size=4)),
        min_size=1,
        max_size=6,
    )
)
def test_property_multipliers_finite_in_unit_interval_and_params_finite(tensors):
    params, grads = [], []
    for weights, gradient in tensors:
        n = min(len(weights), len(gradient))
        w = torch.tensor(weights[:n], dtype=torch.float32)
        w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))  # weights start finite
        params.append(torch.nn.Parameter(w))
        grads.append(torch.tensor(gradient[:n], dtype=torch.float32))
    opt = AutoRGN(torch.optim.SGD(params, lr=1e-3))
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    m = opt.multipliers()
    assert m.shape == (len(params),)
    assert torch.isfinite(m).all() and (m >= 0).all() and (m <= 1).all()
    for p, b, g in zip(params, before, grads):
        if not torch.isfinite(g).all():
            assert torch.equal(p.detach(), b)
        else:
            # SGD with lr 1e-3 on finite values can still overflow for 1e38-sized gradients;
            # what must never happen is a NaN appearing from finite inputs.
            assert not torch.isnan(p).any()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(-100, 100), min_size=1, max_size=5), min_size=1, max_size=5), st.integers(0, 2**16))
@example(shapes=[[1.0], [6.438128759806864e-175]], seed=0)  # a squared norm would underflow to 0
def test_property_fast_multipliers_equal_reference(shapes, seed):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * (torch.rand(()) < 0.8)
    expected = reference_multipliers(params)
    opt = AutoRGN(torch.optim.SGD(params, lr=1e-3))
    opt.step()
    torch.testing.assert_close(opt.multipliers(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_refresh_every_averages_rgn_over_the_window():
    a = torch.nn.Parameter(torch.ones(1))
    b = torch.nn.Parameter(torch.ones(1))
    opt = AutoRGN(torch.optim.SGD([a, b], lr=0.0), refresh_every=3)  # lr 0: weights stay 1, rgn = |g|
    grads = [(1.0, 0.5), (1.0, 1.0), (1.0, 0.0), (0.2, 1.0), (0.2, 1.0), (0.2, 1.0)]
    seen = []
    for ga, gb in grads:
        a.grad, b.grad = torch.tensor([ga]), torch.tensor([gb])
        opt.step()
        seen.append(opt.multipliers().tolist())
    # step 1 initialises from its own gradients; step 3 refreshes from the mean of steps 1-3
    assert seen[0] == [1.0, 0.5]
    assert seen[1] == [1.0, 0.5]
    assert seen[2] == pytest.approx([1.0, 0.5])  # mean rgn: a 1.0, b 0.5
    assert seen[3] == pytest.approx([1.0, 0.5])
    assert seen[5] == pytest.approx([0.2, 1.0])


def test_exclude_by_name_freezes_matching_tensors_and_their_state():
    model = make_model(dtype=torch.float32)
    opt = AutoRGN(torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1), exclude=r"^1\.", model=model)
    bn = model[1]
    before = [bn.weight.detach().clone(), bn.bias.detach().clone()]
    for x, y in batches(3, dtype=torch.float32):
        opt.zero_grad()
        backward(model, x, y)
        opt.step()
    assert torch.equal(bn.weight, before[0]) and torch.equal(bn.bias, before[1])
    assert bn.weight not in opt.state
    m = opt.multipliers()
    assert m[2] == 0 and m[3] == 0 and m.max() == 1


def test_block_multipliers_use_group_names():
    model = make_model(dtype=torch.float32)
    groups = [
        {"params": list(model[0].parameters()) + list(model[1].parameters()), "name": "stem"},
        {"params": list(model[4].parameters()), "name": "middle"},
        {"params": list(model[6].parameters()), "name": "head"},
    ]
    opt = AutoRGN(torch.optim.Adam(groups, lr=1e-3))
    x, y = batches(1, dtype=torch.float32)[0]
    backward(model, x, y)
    opt.step()
    per_block = opt.block_multipliers()
    assert list(per_block) == ["stem", "middle", "head"]
    m = opt.multipliers()
    torch.testing.assert_close(per_block["stem"], m[:4].mean())
    torch.testing.assert_close(per_block["head"], m[6:].mean())
    rows = opt.block_summary()
    assert [r["name"] for r in rows] == ["stem", "middle", "head"]
    assert [r["tensors"] for r in rows] == [4, 2, 2]
    assert [r["params"] for r in rows] == [3 * 4 * 9 + 4 + 4 + 4, 64 * 5 + 5, 5 * 3 + 3]
    assert rows[0]["mean_score"] == pytest.approx(float(m[:4].mean()))
    assert max(r["max_score"] for r in rows) == pytest.approx(1.0)
    assert str(per_block).startswith(f"stem: {float(m[:4].mean()):.4f}, middle: ")


def test_mixed_dtypes_are_grouped_and_match_reference():
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(4, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(3, dtype=torch.float32)),
        torch.nn.Parameter(torch.randn(5, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(2, dtype=torch.float32)),
    ]
    for p in params:
        p.grad = torch.randn_like(p)
    expected = reference_multipliers(params)
    before = [p.detach().clone() for p in params]
    opt = AutoRGN(torch.optim.SGD(params, lr=0.1))
    opt.step()
    torch.testing.assert_close(opt.multipliers(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    for p, b, m in zip(params, before, expected):
        torch.testing.assert_close(p.detach(), b - 0.1 * m * p.grad, rtol=1e-5, atol=1e-6)


def test_bfloat16_parameters():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    opt = AutoRGN(torch.optim.AdamW(model.parameters(), lr=1e-2))
    model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    m = opt.multipliers()
    assert m.dtype == torch.float32 and m.max() == 1 and torch.isfinite(m).all()


def test_reference_helper_agrees_with_hand_computation():
    p = torch.nn.Parameter(torch.tensor([2.0]))
    q = torch.nn.Parameter(torch.tensor([1.0]))
    p.grad, q.grad = torch.tensor([1.0]), torch.tensor([1.0])
    assert reference_multipliers([p, q]) == [0.5, 1.0]
    assert math.isclose(sum(reference_multipliers([p])), 1.0)


def test_idle_tensor_keeps_its_multiplier_between_refreshes():
    a = torch.nn.Parameter(torch.ones(1))
    b = torch.nn.Parameter(torch.ones(1))
    opt = AutoRGN(torch.optim.SGD([a, b], lr=0.0), refresh_every=3)
    a.grad, b.grad = torch.tensor([1.0]), torch.tensor([0.5])
    opt.step()  # initialises: [1, 0.5]
    a.grad, b.grad = torch.tensor([1.0]), None  # b idle: no refresh yet, keeps 0.5
    opt.step()
    assert opt.multipliers().tolist() == [1.0, 0.5]
    a.grad, b.grad = torch.tensor([1.0]), torch.tensor([0.5])
    opt.step()  # refresh from the window mean: a 1.0, b (0.5 + 0 + 0.5) / 3
    assert opt.multipliers().tolist() == pytest.approx([1.0, 1.0 / 3.0])


def test_exclude_pattern_matching_nothing_is_an_error():
    model = make_model()
    with pytest.raises(ValueError, match=r"exclude pattern 'bn' matches no parameter.*names look like: 0\.weight"):
        AutoRGN(torch.optim.SGD(model.parameters(), lr=0.1), exclude=["^1\\.", "bn"], model=model)
    other = make_model(seed=1)
    with pytest.raises(ValueError, match="none of the optimizer's parameters belongs to the model"):
        AutoRGN(torch.optim.SGD(model.parameters(), lr=0.1), exclude="weight", model=other)
    # a pattern that matches is accepted
    AutoRGN(torch.optim.SGD(model.parameters(), lr=0.1), exclude="^1\\.", model=model)
