"""Both wrappers as torch optimizers: schedulers, checkpoints, hooks, closures, no host sync, errors."""

from __future__ import annotations

import contextlib
import copy
import io
import pickle

import pytest
import torch

from surgical_optim import AutoRGN, AutoSNR

WRAPPERS = {
    "rgn": lambda opt: AutoRGN(opt),
    "rgn_window": lambda opt: AutoRGN(opt, refresh_every=3),
    "snr": lambda opt: AutoSNR(opt, threshold=0.4, samples=3),
    "snr_refresh": lambda opt: AutoSNR(opt, threshold=0.4, samples=2, refresh_every=4),
    "snr_official": lambda opt: AutoSNR(opt, threshold=0.95, estimator="official_eb", samples=2),
    "snr_of_rgn": lambda opt: AutoSNR(AutoRGN(opt), threshold=0.4, samples=3),
    "rgn_of_snr": lambda opt: AutoRGN(AutoSNR(opt, threshold=0.4, samples=3), refresh_every=2),
}


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(n)]


def train_step(model, opt, x, y, scheduler=None):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    if scheduler is not None:
        scheduler.step()


def assert_same_state(got, expected, path="state_dict"):
    """Exact, recursive equality of two state dicts."""
    assert type(got) is type(expected), path
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), path
        for key in expected:
            assert_same_state(got[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_same_state(a, b, f"{path}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and torch.equal(got, expected), path
    else:
        assert got == expected, path


def views(opt) -> dict[str, torch.Tensor]:
    """The statistics of every wrapper in a (possibly nested) chain."""
    out = {}
    while isinstance(opt, (AutoRGN, AutoSNR)):
        if isinstance(opt, AutoRGN):
            out["multipliers"] = opt.multipliers()
        else:
            out.update(mask=opt.mask(), raw_snr=opt.raw_snr())
        opt = opt.optimizer
    return out


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_is_an_optimizer_and_scheduler_drives_inner_lr(kind):
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt = WRAPPERS[kind](inner)
    assert isinstance(opt, torch.optim.Optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for x, y in data(3):
        train_step(model, opt, x, y, scheduler)
    assert opt.param_groups is inner.param_groups  # one list, through any depth of wrapping
    assert inner.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert scheduler.get_last_lr() == [pytest.approx(0.1 * 0.5**3)]


def test_one_cycle_and_plateau_schedulers_accept_wrapper():
    model = make_model()
    opt = AutoRGN(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    bare = torch.optim.SGD(make_model().parameters(), lr=0.1, momentum=0.9)
    bare_cycle = torch.optim.lr_scheduler.OneCycleLR(bare, max_lr=1.0, total_steps=10)
    for x, y in data(4):
        train_step(model, opt, x, y, one_cycle)
        bare.step()
        bare_cycle.step()
        # the same schedule (learning rate and, cycled with it, momentum) reaches the inner optimizer
        assert opt.optimizer.param_groups[0]["lr"] == bare.param_groups[0]["lr"]
        assert opt.optimizer.param_groups[0]["momentum"] == bare.param_groups[0]["momentum"]
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(AutoSNR(torch.optim.SGD(model.parameters(), lr=0.1)), patience=0)
    plateau.step(1.0)
    plateau.step(2.0)
    assert plateau.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_state_dict_lockstep_resume_is_bit_identical(kind):
    """Prime, checkpoint (through torch.save), load into a fresh copy, step both, compare exactly."""
    batches = data(12)
    model_a = make_model()
    opt_a = WRAPPERS[kind](torch.optim.AdamW(model_a.parameters(), lr=0.05, weight_decay=0.1))
    for x, y in batches[:5]:  # stop mid-window / mid-collection on purpose
        train_step(model_a, opt_a, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    model_b = make_model(seed=123)
    model_b.load_state_dict(checkpoint["model"])
    opt_b = WRAPPERS[kind](torch.optim.AdamW(model_b.parameters(), lr=0.05, weight_decay=0.1))
    opt_b.load_state_dict(checkpoint["opt"])
    for x, y in batches[5:]:
        train_step(model_a, opt_a, x, y)
        train_step(model_b, opt_b, x, y)
        for a, b in zip(model_a.parameters(), model_b.parameters()):
            assert torch.equal(a, b)
    for (name, a), (_, b) in zip(views(opt_a).items(), views(opt_b).items()):
        assert torch.equal(a, b), name


def trained(kind: str, steps: int = 2, model=None):
    model = make_model() if model is None else model
    opt = WRAPPERS[kind](torch.optim.AdamW(model.parameters(), lr=0.05))
    for x, y in data(steps):
        train_step(model, opt, x, y)
    return opt


@pytest.mark.parametrize("kind", ["rgn", "snr"])
def test_checkpoint_of_a_model_with_other_tensors_is_refused_before_loading(kind):
    """Six tensors saved, four here: the wrapper names the mismatch before the inner optimizer (whose
    own check only says a group's size differs) or itself has loaded anything."""
    source = trained(kind)
    smaller = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    target = trained(kind, model=smaller)
    before = copy.deepcopy(target.state_dict())
    name = type(target).__name__
    with pytest.raises(ValueError, match=rf"{name} state holds 6 entries.*{name}\(AdamW\) has 4 parameters"):
        target.load_state_dict(source.state_dict())
    assert_same_state(target.state_dict(), before)


def test_checkpoint_of_a_model_with_other_shapes_is_refused_before_loading():
    """Same number of tensors, other shapes: torch's optimizers load such a checkpoint (they compare
    group sizes only), so AutoSNR's per-element sums are what reveal it - at load, not steps later."""
    source = trained("snr")  # mid-calibration: the sums exist
    wider = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)
    )
    target = trained("snr", model=wider)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"'sums' of parameter 0 has shape \(7, 5\).*has shape \(8, 5\)"):
        target.load_state_dict(source.state_dict())
    assert_same_state(target.state_dict(), before)


@pytest.mark.parametrize("kind", ["rgn_window", "snr"])
def test_plain_inner_state_dict_is_accepted(kind):
    """Resuming a run that started without the wrapper: the inner state loads, the wrapper starts
    fresh - as if it had been put around the resumed bare optimizer."""
    model = make_model()
    bare = torch.optim.Adam(model.parameters(), lr=0.1)
    for x, y in data(2):
        train_step(model, bare, x, y)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": bare.state_dict()})
    runs = []
    for load_into_wrapper in (True, False):
        checkpoint = copy.deepcopy(saved)  # torch's load_state_dict keeps the checkpoint's tensors
        model.load_state_dict(checkpoint["model"])
        inner = torch.optim.Adam(model.parameters(), lr=0.1)
        if not load_into_wrapper:
            inner.load_state_dict(checkpoint["opt"])
        opt = WRAPPERS[kind](inner)
        if load_into_wrapper:
            opt.load_state_dict(checkpoint["opt"])
        for x, y in data(4, seed=3):
            train_step(model, opt, x, y)
        runs.append(([p.detach().clone() for p in model.parameters()], views(opt)))
    (params_a, views_a), (params_b, views_b) = runs
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert all(torch.equal(views_a[name], views_b[name]) for name in views_b)


@pytest.mark.parametrize("kind", ["rgn", "snr"])
def test_step_and_state_dict_hooks_fire(kind):
    model = make_model()
    opt = WRAPPERS[kind](torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("sd", o)))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load", o)))
    train_step(model, opt, *data(1)[0])
    opt.load_state_dict(opt.state_dict())
    assert [c[0] for c in calls] == ["pre", "post", "sd", "load"]
    assert all(c[1] is opt for c in calls)


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_closure_is_evaluated_once_before_statistics(kind):
    """Lightning passes a closure that runs forward+backward inside step()."""
    model = make_model()
    opt = WRAPPERS[kind](torch.optim.SGD(model.parameters(), lr=0.1))
    reference_model = make_model()
    reference = WRAPPERS[kind](torch.optim.SGD(reference_model.parameters(), lr=0.1))
    calls = []
    for x, y in data(6):
        def closure(x=x, y=y):
            calls.append(1)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert torch.is_tensor(loss) and loss.ndim == 0
        train_step(reference_model, reference, x, y)
    assert len(calls) == 6
    for a, b in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(a, b)


def test_lbfgs_inner_receives_a_working_closure():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    target = torch.tensor([1.0, -2.0, 0.5])
    opt = AutoSNR(torch.optim.LBFGS([w], lr=1.0, max_iter=20), threshold=0.0)

    def closure():
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    torch.testing.assert_close(w.detach(), target, atol=1e-4, rtol=0)


def test_zero_grad_and_add_param_group():
    model = make_model()
    extra = torch.nn.Linear(3, 2)
    opt = AutoRGN(torch.optim.SGD(model.parameters(), lr=0.1))
    train_step(model, opt, *data(1)[0])
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.add_param_group({"params": list(extra.parameters()), "lr": 0.01, "name": "extra"})
    assert len(opt.param_groups) == 2 and len(opt.optimizer.param_groups) == 2
    x, y = data(1)[0]
    opt.zero_grad()
    (torch.nn.functional.cross_entropy(model(x), y) + extra(torch.randn(4, 3)).sum()).backward()
    params = list(model.parameters()) + list(extra.parameters())
    # the paper's rule over all eight tensors, new group included: ||g|| / ||theta||, over the largest
    rgn = torch.stack([p.grad.norm() / p.norm() for p in params])
    expected = rgn / rgn.max()
    before = [p.detach().clone() for p in extra.parameters()]
    opt.step()
    torch.testing.assert_close(opt.multipliers(), expected)
    for p, old, m in zip(extra.parameters(), before, expected[6:]):  # the new group's own lr, times m
        torch.testing.assert_close(p.detach(), old - 0.01 * m * p.grad)
    assert set(opt.block_multipliers()) == {"group0", "extra"}
    snr = AutoSNR(torch.optim.SGD(model.parameters(), lr=0.1), threshold=0.5, samples=2)
    snr.add_param_group({"params": list(extra.parameters())})
    for x, y in data(2):
        snr.zero_grad()
        (torch.nn.functional.cross_entropy(model(x), y) + extra(x[:, :3]).pow(2).sum()).backward()
        snr.step()
    assert snr.mask().shape == (8,) and (snr.raw_snr()[6:] > 0).all()  # the new tensors were measured


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_deepcopy_and_pickle(kind):
    model = make_model()
    opt = WRAPPERS[kind](torch.optim.Adam(model.parameters(), lr=0.1))
    for x, y in data(4):
        train_step(model, opt, x, y)
    clone = copy.deepcopy({"model": model, "opt": opt})
    pickled = pickle.loads(pickle.dumps(clone))
    assert isinstance(pickled["opt"], type(opt))
    runs = [(model, opt), (clone["model"], clone["opt"]), (pickled["model"], pickled["opt"])]
    for x, y in data(3, seed=5):
        for run_model, run_opt in runs:
            train_step(run_model, run_opt, x, y)
    for run_model, run_opt in runs[1:]:  # copies continue exactly, statistics included
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), run_model.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(views(opt).values(), views(run_opt).values()))


SYNC_CALLS = ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"]


@contextlib.contextmanager
def host_sync_forbidden(allowed: dict[str, int] | None = None):
    """Make the usual host-synchronising tensor calls raise (``allowed``: name -> calls tolerated)."""
    saved = {name: getattr(torch.Tensor, name) for name in SYNC_CALLS}
    budget = dict(allowed or {})

    def forbid(name):
        def raiser(*args, **kwargs):
            if budget.get(name, 0) > 0:
                budget[name] -= 1
                return saved[name](*args, **kwargs)
            raise AssertionError(f"host synchronisation: Tensor.{name} called inside step()")

        return raiser

    try:
        for name in SYNC_CALLS:
            setattr(torch.Tensor, name, forbid(name))
        yield budget
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("kind", ["rgn", "rgn_window"])
@pytest.mark.parametrize("foreach", [False, True])
def test_no_host_synchronisation_inside_auto_rgn_step(kind, foreach, device_paths):
    model = make_model()
    opt = WRAPPERS[kind](torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=foreach))
    for x, y in data(8):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with host_sync_forbidden():
            opt.step()
    # and the guard itself works
    with pytest.raises(AssertionError, match="host synchronisation"):
        with host_sync_forbidden():
            torch.ones(1).item()


@pytest.mark.parametrize("kind", ["snr", "snr_refresh", "snr_of_rgn", "snr_official"])
@pytest.mark.parametrize("foreach", [False, True])
def test_auto_snr_reads_the_host_only_once_per_estimate(kind, foreach, device_paths):
    """Freezing needs the mask on the host (to drop gradients): one read of n booleans, at the
    step after each estimate, from a copy issued without blocking. Every other step is sync-free."""
    model = make_model()
    opt = WRAPPERS[kind](torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=foreach))
    reads_at = []
    for step, (x, y) in enumerate(data(10)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with host_sync_forbidden({"numpy": 1}) as budget:
            opt.step()
        if budget["numpy"] == 0:
            reads_at.append(step)
    estimates_end = {"snr": [2], "snr_refresh": [1, 5, 9], "snr_of_rgn": [2], "snr_official": [1]}[kind]
    assert reads_at == [s + 1 for s in estimates_end if s + 1 < 10]


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda m: AutoRGN(m), TypeError, "torch.optim.Optimizer"),
        (lambda m: AutoRGN(list(m.parameters())), TypeError, "Optimizer"),
        (lambda m: AutoSNR(torch.optim.SGD(m.parameters(), lr=0.1), threshold=1.5), ValueError, r"\[0, 1\]"),
        (lambda m: AutoSNR(torch.optim.SGD(m.parameters(), lr=0.1), threshold=-0.1), ValueError, r"\[0, 1\]"),
        (lambda m: AutoSNR(torch.optim.SGD(m.parameters(), lr=0.1), threshold="high"), TypeError, "number"),
        (lambda m: AutoSNR(torch.optim.SGD(m.parameters(), lr=0.1), samples=1), ValueError, "samples"),
        (lambda m: AutoSNR(torch.optim.SGD(m.parameters(), lr=0.1), estimator="magic"), ValueError, "samples, official_eb"),
        (lambda m: AutoSNR(torch.optim.SGD(m.parameters(), lr=0.1), samples=5, refresh_every=3), ValueError, "refresh_every"),
        (lambda m: AutoRGN(torch.optim.SGD(m.parameters(), lr=0.1), refresh_every=0), ValueError, "refresh_every"),
        (lambda m: AutoRGN(torch.optim.SGD(m.parameters(), lr=0.1), exclude="bn"), ValueError, "model=model"),
        (lambda m: AutoRGN(torch.optim.SGD(m.parameters(), lr=0.1), exclude="(", model=m), ValueError, "regex"),
        (lambda m: AutoRGN(torch.optim.SGD(m.parameters(), lr=0.1), exclude=3, model=m), TypeError, "regex"),
        (lambda m: AutoRGN(torch.optim.SGD(m.parameters(), lr=0.1), momentum=0.9), TypeError, "momentum"),
    ],
)
def test_bad_arguments_get_clear_errors(build, error, match):
    with pytest.raises(error, match=match):
        build(make_model())


@pytest.mark.parametrize(
    "build",
    [
        lambda opt: AutoRGN(AutoRGN(opt)),
        lambda opt: AutoSNR(AutoSNR(opt)),
        lambda opt: AutoRGN(AutoSNR(AutoRGN(opt))),  # anywhere in the chain
    ],
    ids=["rgn_rgn", "snr_snr", "rgn_snr_rgn"],
)
def test_wrapping_the_same_wrapper_twice_is_refused_at_construction(build):
    """Nesting one kind twice would apply its rule twice (and both would claim one checkpoint key)."""
    with pytest.raises(ValueError, match=r"twice.*wrap the inner optimizer once"):
        build(torch.optim.SGD(make_model().parameters(), lr=0.1))


@pytest.mark.parametrize(
    "saved, loaded, holds",
    [
        ("snr", "rgn", "AutoSNR"),
        ("rgn", "snr", "AutoRGN"),
        ("snr_of_rgn", "rgn", "AutoSNR"),  # AutoRGN's part would load, AutoSNR's would be dropped
    ],
)
def test_checkpoint_of_another_wrapper_is_refused(saved, loaded, holds):
    model = make_model()
    source = WRAPPERS[saved](torch.optim.SGD(model.parameters(), lr=0.1))
    for x, y in data(2):
        train_step(model, source, x, y)
    target = WRAPPERS[loaded](torch.optim.SGD(make_model().parameters(), lr=0.1))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=rf"holds {holds} state.*{type(target).__name__}\("):
        target.load_state_dict(source.state_dict())
    assert_same_state(target.state_dict(), before)  # refused before anything was loaded


def test_checkpoint_without_state_of_a_nested_wrapper_starts_that_wrapper_fresh():
    """Like a plain inner-optimizer checkpoint: a wrapper added around a resumed run starts fresh."""
    model = make_model()
    source = AutoRGN(torch.optim.SGD(model.parameters(), lr=0.1), refresh_every=2)
    for x, y in data(3):
        train_step(model, source, x, y)
    target = AutoSNR(AutoRGN(torch.optim.SGD(model.parameters(), lr=0.1), refresh_every=2), threshold=0.4)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.optimizer.multipliers(), source.multipliers())
    assert not target.calibrated and torch.equal(target.mask(), torch.ones(6))
