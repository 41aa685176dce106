"""AutoRGN's folded update (torch SGD/Adam/AdamW run here with lr x m per tensor) against the
snapshot path; test_auto_rgn.py holds both to the paper's one-param-group-per-tensor definition."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import surgical_optim._fold as fold_module
from surgical_optim import AutoRGN

from test_auto_rgn import backward, batches, make_model

# (builder over two param groups, whether momentum-free SGD, which folds from the first step)
FOLDABLE = {
    "sgd": lambda g: torch.optim.SGD(g, lr=0.05),
    "sgd_momentum_dampening_wd": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-2),
    "sgd_nesterov_wd": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd_maximize": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.5, maximize=True, weight_decay=1e-3),
    "adam_wd": lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=1e-2),
    "adam_amsgrad_maximize": lambda g: torch.optim.Adam(g, lr=1e-2, amsgrad=True, maximize=True),
    "adam_decoupled": lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True),
    "adamw": lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1),
    "adamw_amsgrad": lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=False),
}


def two_groups(model: torch.nn.Module, lr_scale: float = 0.3) -> list[dict]:
    params = list(model.parameters())
    return [{"params": params[:3]}, {"params": params[3:], "lr_scale": lr_scale}]


def build(name: str, model: torch.nn.Module, update: str) -> AutoRGN:
    inner = FOLDABLE[name](two_groups(model))
    inner.param_groups[1]["lr"] *= inner.param_groups[1].pop("lr_scale")  # a second learning rate
    return AutoRGN(inner, update=update)


ADAM_PATHS = ["host_step_sizes", "device_step_sizes"]


def use_adam_path(path: str, monkeypatch) -> None:
    """On the CPU, Adam's step sizes are host scalars; on accelerators (and under torch.compile) they
    are 0-d device tensors in the denominator. The second is forced here so that it runs on this CPU."""
    if path == "device_step_sizes":
        monkeypatch.setattr(fold_module, "host_readable", lambda device: False)


CASES = [(name, path) for name in sorted(FOLDABLE) for path in (ADAM_PATHS if "adam" in name else ADAM_PATHS[:1])]


@pytest.mark.parametrize("name, adam_path", CASES)
def test_folded_update_equals_snapshot_path(name, adam_path, monkeypatch):
    use_adam_path(adam_path, monkeypatch)
    fold_model, snap_model = make_model(), make_model()
    fold, snap = build(name, fold_model, "per_tensor_lr"), build(name, snap_model, "scaled_step")
    for step, (x, y) in enumerate(batches(6)):
        for model, opt in ((fold_model, fold), (snap_model, snap)):
            opt.zero_grad()
            backward(model, x, y)
            opt.step()
        # SGD without momentum has no state to create; the others fold from their second step on
        assert fold.last_step_folded == (step > 0 or name == "sgd")
        assert not snap.last_step_folded
        if fold.last_step_folded:
            assert not fold._snapshots  # no parameter-sized buffer is kept while folding
        torch.testing.assert_close(fold.multipliers(), snap.multipliers(), rtol=1e-12, atol=1e-14)
        for a, b in zip(fold_model.parameters(), snap_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    for a, b in zip(fold_model.parameters(), snap_model.parameters()):
        assert fold.state[a].keys() == snap.state[b].keys()
        for key, value in fold.state[a].items():
            torch.testing.assert_close(value, snap.state[b][key], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("adam_path", ADAM_PATHS)
def test_float32_fold_tracks_snapshot(adam_path, monkeypatch):
    """float32 within its rounding; float16/bfloat16 are held to torch's per-tensor-lr update, one
    rounding at a time, in test_low_precision.py."""
    use_adam_path(adam_path, monkeypatch)
    fold_model, snap_model = make_model(dtype=torch.float32), make_model(dtype=torch.float32)
    fold, snap = build("adamw", fold_model, "per_tensor_lr"), build("adamw", snap_model, "scaled_step")
    for x, y in batches(4, dtype=torch.float32):
        for model, opt in ((fold_model, fold), (snap_model, snap)):
            opt.zero_grad()
            backward(model, x, y)
            opt.step()
    for a, b in zip(fold_model.parameters(), snap_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert fold.last_step_folded


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["sgd_momentum_dampening_wd", "adamw"])
def test_non_finite_gradient_on_a_folded_step_never_corrupts(bad, name, both_paths):
    model = make_model()
    opt = AutoRGN(FOLDABLE[name](model.parameters()), update="per_tensor_lr")
    data = batches(3)
    for x, y in data[:2]:
        opt.zero_grad()
        backward(model, x, y)
        opt.step()
    first = next(model.parameters())
    before = first.detach().clone()
    opt.zero_grad()
    backward(model, *data[2])
    first.grad.view(-1)[1] = bad
    opt.step()
    assert opt.last_step_folded
    assert opt.multipliers()[0] == 0
    assert torch.equal(first.detach(), before)  # m = 0 is an exact no-op, weight decay included
    for p in model.parameters():
        assert torch.isfinite(p).all()
        for value in opt.state[p].values():
            assert torch.isfinite(value).all()


def test_checkpoints_move_between_fold_and_snapshot():
    """The inner optimizer's state is the same either way, so a checkpoint resumes on either path."""
    model = make_model()
    opt = AutoRGN(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), update="per_tensor_lr")
    data = batches(6)
    for x, y in data[:3]:
        opt.zero_grad()
        backward(model, x, y)
        opt.step()
    checkpoint = copy.deepcopy(opt.state_dict())
    twins = []
    for update in ("per_tensor_lr", "scaled_step"):
        twin_model = copy.deepcopy(model)
        twin = AutoRGN(torch.optim.AdamW(twin_model.parameters(), lr=1e-2, weight_decay=0.1), update=update)
        twin.load_state_dict(copy.deepcopy(checkpoint))
        for x, y in data[3:]:
            twin.zero_grad()
            backward(twin_model, x, y)
            twin.step()
        assert twin.last_step_folded == (update == "per_tensor_lr")  # resumed state: no first-step detour
        twins.append(twin_model)
    for a, b in zip(*(m.parameters() for m in twins)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_auto_takes_the_snapshot_path_where_folding_does_not_apply():
    model = make_model()
    cases = {
        "rmsprop": torch.optim.RMSprop(model.parameters(), lr=1e-3),
        "fused": torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
        "subclass": type("MyAdam", (torch.optim.Adam,), {})(model.parameters(), lr=1e-3),
        "tensor_lr": torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1)),
    }
    for label, inner in cases.items():
        opt = AutoRGN(inner)
        for x, y in batches(2):
            opt.zero_grad()
            backward(model, x, y)
            opt.step()
        assert not opt.last_step_folded, label
        with pytest.raises(ValueError, match="update='auto' or 'scaled_step'"):
            AutoRGN(inner, update="per_tensor_lr")
    with pytest.raises(ValueError, match="'auto', 'per_tensor_lr' or 'scaled_step'"):
        AutoRGN(torch.optim.SGD(model.parameters(), lr=0.1), update="fused")


def test_hooks_and_schedulers_on_the_inner_optimizer_still_run():
    """Folding would skip the inner step, so anything attached to it sends the step through it."""
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = AutoRGN(inner)
    calls = []
    handle = inner.register_step_post_hook(lambda *args: calls.append(1))
    for x, y in batches(3):
        opt.zero_grad()
        backward(model, x, y)
        opt.step()
        assert not opt.last_step_folded
    assert len(calls) == 3
    handle.remove()
    opt.zero_grad()
    backward(model, *batches(1)[0])
    opt.step()
    assert opt.last_step_folded and len(calls) == 3

    # a scheduler built on the inner optimizer wraps inner.step to notice it was called
    model2 = make_model()
    inner2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    opt2 = AutoRGN(inner2)
    scheduler = torch.optim.lr_scheduler.StepLR(inner2, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would raise
        for x, y in batches(2):
            opt2.zero_grad()
            backward(model2, x, y)
            opt2.step()
            scheduler.step()
    assert not opt2.last_step_folded


def test_folded_adam_step_reads_only_torchs_cpu_step_counters(device_paths):
    """No host synchronisation: the only host reads are the CPU step counters that bare
    torch.optim.Adam reads the same way (checked by identity, every other .item() raises)."""
    model = make_model()
    opt = AutoRGN(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    data = batches(4)
    opt.zero_grad()
    backward(model, *data[0])
    opt.step()  # creates the state
    counters = {id(s["step"]) for s in opt.state.values()}
    original = torch.Tensor.item
    reads = []

    def guarded_item(self):
        if id(self) not in counters:
            raise AssertionError("host synchronisation: Tensor.item inside a folded step")
        reads.append(1)
        return original(self)

    forbidden = ["tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"]
    saved = {name: getattr(torch.Tensor, name) for name in forbidden}

    def raiser(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name} inside a folded step")

        return raise_

    for x, y in data[1:]:
        opt.zero_grad()
        backward(model, x, y)
        try:
            torch.Tensor.item = guarded_item
            for name in forbidden:
                setattr(torch.Tensor, name, raiser(name))
            opt.step()
        finally:
            torch.Tensor.item = original
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)
        assert opt.last_step_folded
    assert len(reads) == 3 * len(counters)


def test_moving_a_tensor_between_param_groups_is_noticed():
    """Same tensors in the same order, different group boundaries: the folded update must use the
    new group's learning rate, as the inner optimizer would."""
    results = []
    for update in ("per_tensor_lr", "scaled_step"):
        torch.manual_seed(0)
        a, b, c = (torch.nn.Parameter(torch.randn(4)) for _ in range(3))
        opt = AutoRGN(torch.optim.SGD([{"params": [a, b], "lr": 0.1}, {"params": [c], "lr": 0.01}]), update=update)
        for regroup in (False, True):
            if regroup:  # b moves to the second group; the flat order a, b, c stays
                opt.param_groups[0]["params"] = [a]
                opt.param_groups[1]["params"] = [b, c]
            for p in (a, b, c):
                p.grad = torch.ones(4)
            opt.step()
        assert opt.last_step_folded == (update == "per_tensor_lr")
        results.append([p.detach().clone() for p in (a, b, c)])
    for x, y in zip(*results):
        torch.testing.assert_close(x, y)


def test_switching_momentum_on_mid_run_matches_torch():
    """The fold's readiness cache must notice that momentum now needs a buffer (torch creates it)."""
    from surgical_optim.auto_rgn_reference import per_tensor_lr_step

    model, ref_model = make_model(), make_model()
    opt = AutoRGN(torch.optim.SGD(model.parameters(), lr=0.05), update="auto")
    ref_params = list(ref_model.parameters())
    ref = torch.optim.SGD([{"params": [p]} for p in ref_params], lr=0.05)
    for step, (x, y) in enumerate(batches(5)):
        if step == 2:
            for optimizer in (opt, ref):
                for group in optimizer.param_groups:
                    group["momentum"] = 0.9
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            backward(m, x, y)
        opt.step()
        per_tensor_lr_step(ref, ref_params, 0.05)
        # momentum-free steps fold; the step that creates the buffers does not; later ones fold again
        assert opt.last_step_folded == (step != 2)
        for a, b in zip(model.parameters(), ref_params):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("update", ["per_tensor_lr", "scaled_step"])
def test_global_optimizer_hooks_fire_alike_on_both_paths(update):
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model = make_model()
    opt = AutoRGN(torch.optim.AdamW(model.parameters(), lr=1e-2), update=update)
    seen: list[tuple[str, str]] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append(("post", type(o).__name__))),
    ]
    try:
        for x, y in batches(3):
            opt.zero_grad()
            backward(model, x, y)
            opt.step()
    finally:
        for handle in handles:
            handle.remove()
    # every step: the wrapper's step and, inside it, the inner optimizer's step, whichever path runs
    per_step = [("pre", "AutoRGN"), ("pre", "AdamW"), ("post", "AdamW"), ("post", "AutoRGN")]
    assert seen == per_step * 3
