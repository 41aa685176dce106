"""AutoRGN's normaliser options (quantile, max_over, per) against the slow reference, by hand, and on
the failure they exist for: one tiny tensor squashing every other multiplier."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from surgical_optim import AutoRGN
from surgical_optim.auto_rgn_reference import ReferenceAutoRGN, per_tensor_lr_step, reference_multipliers

from test_auto_rgn import backward, batches, make_model
from test_wrapper_protocol import host_sync_forbidden

OPTIONS = [
    {"quantile": q, "max_over": over, "per": per}
    for q in (1.0, 0.9, 0.5)
    for over in ("all", "matrices")
    for per in ("tensor", "group")
]


def option_id(options: dict) -> str:
    return "-".join(f"{value}" for value in options.values())


def group_index_of(opt) -> list[int]:
    return [k for k, group in enumerate(opt.param_groups) for _ in group["params"]]


# ------------------------------------------------------------------ against the reference
tensor_specs = st.tuples(
    st.sampled_from([(), (3,), (2, 3), (2, 2, 2)]),  # shape: 0-D, 1-D and 2+-D tensors
    st.sampled_from([1.0, 1e-3, 1e-8, 1e-150, 0.0]),  # weight scale: tiny norms and zero weights
    st.sampled_from([1.0, 1e-2, 0.0, None]),  # gradient scale (None: no gradient)
    st.integers(0, 2),  # param group
)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(tensor_specs, min_size=1, max_size=7),
    st.sampled_from([1.0, 0.9, 0.5, 0.2, 0.01]),
    st.sampled_from(["all", "matrices"]),
    st.sampled_from(["tensor", "group"]),
    st.sampled_from(["scaled_step", "per_tensor_lr"]),
    st.integers(0, 2**16),
)
def test_property_fast_multipliers_equal_reference(specs, quantile, max_over, per, update, seed):
    torch.manual_seed(seed)
    specs = sorted(specs, key=lambda spec: spec[3])  # param groups hold consecutive tensors
    params = [torch.nn.Parameter(torch.randn(shape, dtype=torch.float64) * scale) for shape, scale, _, _ in specs]
    for p, (_, _, grad_scale, _) in zip(params, specs):
        p.grad = None if grad_scale is None else torch.randn_like(p) * grad_scale
    assume(any(p.grad is not None for p in params))  # else no step is measured: multipliers stay 1
    groups = [{"params": [p for p, spec in zip(params, specs) if spec[3] == k]} for k in range(3)]
    groups = [g for g in groups if g["params"]]
    opt = AutoRGN(torch.optim.SGD(groups, lr=1e-3), update=update, quantile=quantile, max_over=max_over, per=per)
    expected = reference_multipliers(
        params, quantile=quantile, max_over=max_over, per=per, group_index=group_index_of(opt)
    )
    opt.step()
    torch.testing.assert_close(opt.multipliers(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def make_mlp(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """No bias before a BatchNorm here: its gradient is rounding noise, which Adam turns into steps of
    size lr, so per="group" (which moves it) would make trajectories chaotic at the 1e-12 level."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers).to(dtype)


def mlp_batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(10, 6, generator=g, dtype=dtype), torch.randint(0, 3, (10,), generator=g)) for _ in range(n)]


def two_groups(model: torch.nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [{"params": params[:4]}, {"params": params[4:]}]


@pytest.mark.parametrize("update", ["scaled_step", "per_tensor_lr"])
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_trajectory_equals_references(options, update):
    """Adam over two param groups, six steps: the same multipliers and weights as the reference that
    rescales each tensor's step and as the paper's one param group per tensor with lr x m."""
    fast_model, ref_model, lr_model = make_mlp(), make_mlp(), make_mlp()
    fast = AutoRGN(torch.optim.Adam(two_groups(fast_model), lr=1e-2), update=update, **options)
    ref = ReferenceAutoRGN(torch.optim.Adam(two_groups(ref_model), lr=1e-2), **options)
    lr_params = list(lr_model.parameters())
    per_tensor = torch.optim.Adam([{"params": [p]} for p in lr_params], lr=1e-2)
    for x, y in mlp_batches(6):
        for model, opt in ((fast_model, fast), (ref_model, ref.optimizer), (lr_model, per_tensor)):
            opt.zero_grad()
            backward(model, x, y)
        fast.step()
        ref.step()
        per_tensor_lr_step(per_tensor, lr_params, 1e-2, group_index=group_index_of(fast), **options)
        torch.testing.assert_close(fast.multipliers(), torch.tensor(ref.last_multipliers, dtype=torch.float64), rtol=1e-10, atol=1e-13)
        for a, b, c in zip(fast_model.parameters(), ref_model.parameters(), lr_params):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    assert fast.last_step_folded == (update == "per_tensor_lr")


@pytest.mark.parametrize("options", OPTIONS[1:], ids=option_id)
def test_float32_multipliers_match_the_double_reference(options):
    model = make_mlp(torch.float32)
    opt = AutoRGN(torch.optim.AdamW(two_groups(model), lr=1e-2), **options)
    for x, y in mlp_batches(3, dtype=torch.float32):
        opt.zero_grad()
        backward(model, x, y)
        expected = reference_multipliers(opt.params(), group_index=group_index_of(opt), **options)
        opt.step()
        torch.testing.assert_close(opt.multipliers(), torch.tensor(expected), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the defaults are the paper's rule
@pytest.mark.parametrize("refresh_every", [1, 3])
@pytest.mark.parametrize("update", ["scaled_step", "per_tensor_lr"])
def test_defaults_are_bit_identical_to_the_paper_rule(update, refresh_every):
    plain_model, explicit_model = make_model(dtype=torch.float32), make_model(dtype=torch.float32)
    plain = AutoRGN(torch.optim.AdamW(plain_model.parameters(), lr=1e-2), update=update, refresh_every=refresh_every)
    explicit = AutoRGN(
        torch.optim.AdamW(explicit_model.parameters(), lr=1e-2),
        update=update,
        refresh_every=refresh_every,
        quantile=1.0,
        max_over="all",
        per="tensor",
    )
    for x, y in batches(7, dtype=torch.float32):
        for model, opt in ((plain_model, plain), (explicit_model, explicit)):
            opt.zero_grad()
            backward(model, x, y)
            opt.step()
        assert torch.equal(plain.multipliers(), explicit.multipliers())
        assert all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), explicit_model.parameters()))


def test_quantile_one_over_matrices_only_is_bit_identical_to_the_largest():
    """Without 1-D tensors, max_over="matrices" at quantile 1 goes through the quantile path and
    must give exactly the paper's division by the largest RGN."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 8, bias=False), torch.nn.Tanh(), torch.nn.Linear(8, 3, bias=False)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    plain = AutoRGN(torch.optim.Adam(models[0].parameters(), lr=1e-2))
    matrices = AutoRGN(torch.optim.Adam(models[1].parameters(), lr=1e-2), max_over="matrices")
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        x, y = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
        for model, opt in zip(models, (plain, matrices)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert torch.equal(plain.multipliers(), matrices.multipliers())
        assert 0 < plain.multipliers().min() < 1
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


# ------------------------------------------------------------------ the failure these options fix
def mlp_with_zero_head_bias() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(5):
        layers += [torch.nn.Linear(16, 16), torch.nn.Tanh()]
    head = torch.nn.Linear(16, 4)
    torch.nn.init.zeros_(head.bias)  # a fresh classifier bias: 1 of 12 tensors
    return torch.nn.Sequential(*layers, head)


def train_mlp(steps: int, **options) -> tuple[float, torch.Tensor]:
    """Loss decrease over ``steps`` full-batch AdamW steps, and the multipliers after the second."""
    model = mlp_with_zero_head_bias()
    opt = AutoRGN(torch.optim.AdamW(model.parameters(), lr=3e-3), **options)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 16, generator=g), torch.randint(0, 4, (256,), generator=g)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 1:  # the bias has moved off zero: now the tiny tensor with the largest RGN
            second_step = opt.multipliers()
    return losses[0] - losses[-1], second_step


@pytest.mark.parametrize("fix", [{"quantile": 0.9}, {"max_over": "matrices"}, {"per": "group"}], ids=option_id)
def test_a_fresh_bias_no_longer_squashes_the_weights(fix, one_thread):
    default_drop, default_m = train_mlp(40)
    fixed_drop, fixed_m = train_mlp(40, **fix)
    weights = slice(0, 10, 2)  # the five hidden weight matrices
    # the paper's rule: the fresh bias's RGN divides everything, the weights barely move
    assert default_m[-1] == 1 and default_m[weights].max() < 0.01
    assert fixed_m[weights].min() > 0.1
    # default: the loss falls by about 0.009 in 40 steps; fixed: by 0.07 to 0.15
    assert default_drop < 0.02 and fixed_drop > 0.05 and fixed_drop > 4 * default_drop


# ------------------------------------------------------------------ per="group" by hand
def test_group_multiplier_by_hand_is_shared_and_ignores_excluded_tensors():
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    model.b = torch.nn.Parameter(torch.tensor([12.0], dtype=torch.float64))
    model.skip = torch.nn.Parameter(torch.tensor([1e-3], dtype=torch.float64))
    model.c = torch.nn.Parameter(torch.tensor([6.0, 8.0], dtype=torch.float64))
    groups = [{"params": [model.a, model.b, model.skip], "name": "first"}, {"params": [model.c], "name": "second"}]
    opt = AutoRGN(torch.optim.SGD(groups, lr=1.0), per="group", exclude="skip", model=model)
    model.a.grad = torch.tensor([0.0, 3.0], dtype=torch.float64)
    model.b.grad = torch.tensor([4.0], dtype=torch.float64)
    model.skip.grad = torch.tensor([100.0], dtype=torch.float64)  # excluded: counts nowhere
    model.c.grad = torch.tensor([1.0, 0.0], dtype=torch.float64)
    opt.step()
    # first: ||g|| = sqrt(9 + 16) = 5, ||w|| = sqrt(9 + 16 + 144) = 13: RGN 5/13
    # second: 1/10; per tensor it would be 0.6, 1/3 and 0.1
    torch.testing.assert_close(opt.multipliers(), torch.tensor([1.0, 1.0, 0.0, 0.1 * 13 / 5], dtype=torch.float64))
    torch.testing.assert_close(model.b.detach(), torch.tensor([8.0], dtype=torch.float64))
    assert model.skip.item() == 1e-3  # not trained
    blocks = opt.block_multipliers()
    torch.testing.assert_close(blocks["second"], torch.tensor(0.26, dtype=torch.float64))


def test_every_tensor_of_a_block_shares_its_multiplier():
    from surgical_optim import param_groups_by_block

    model = make_model(dtype=torch.float32)
    groups = param_groups_by_block(model)
    opt = AutoRGN(torch.optim.AdamW(groups, lr=1e-2), per="group", quantile=0.5)
    for x, y in batches(3, dtype=torch.float32):
        opt.zero_grad()
        backward(model, x, y)
        opt.step()
    m = opt.multipliers()
    start = 0
    for group in opt.param_groups:
        shared = m[start : start + len(group["params"])]
        assert torch.equal(shared, shared[:1].expand_as(shared)), group.get("name")
        start += len(group["params"])
    assert len(groups) > 2 and len(set(m.tolist())) > 1 and m.max() == 1


# ------------------------------------------------------------------ windows, checkpoints, no sync
@pytest.mark.parametrize("per", ["tensor", "group"])
def test_refresh_every_averages_over_the_window_before_the_quantile(per):
    """lr 0 keeps every weight 1, so RGN = |g|. Four tensors (one group each for per="group"),
    d without a gradient in step 2; the median of the window means sets the scale."""
    params = [torch.nn.Parameter(torch.ones(1)) for _ in range(4)]
    opt = AutoRGN(torch.optim.SGD([{"params": [p]} for p in params], lr=0.0), refresh_every=3, quantile=0.5, per=per)
    grads = [(1.0, 0.2, 0.3, 0.6), (1.0, 0.2, 0.9, None), (1.0, 0.2, 0.0, 0.6)]
    seen = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else torch.tensor([g])
        opt.step()
        seen.append(opt.multipliers())
    # step 1 initialises: median of (1, 0.2, 0.3, 0.6) = 0.45
    torch.testing.assert_close(seen[0], torch.tensor([1.0, 0.2 / 0.45, 0.3 / 0.45, 1.0]))
    torch.testing.assert_close(seen[1], seen[0])  # mid-window: unchanged
    # window means 1, 0.2, 0.4, 0.4 (d's idle step counts 0): median 0.4
    torch.testing.assert_close(seen[2], torch.tensor([1.0, 0.5, 1.0, 1.0]))


def test_refresh_every_window_takes_part_if_any_step_did():
    """A tensor with a bounded RGN at one step of the window and a zero weight at a later one took part:
    the window's scale set holds it, as the window's largest RGN would."""
    params = [torch.nn.Parameter(torch.ones(1)) for _ in range(3)]
    opt = AutoRGN(torch.optim.SGD(params, lr=0.0), refresh_every=2, max_over="matrices")
    for weight_a in (1.0, 0.0):
        params[0].data.fill_(weight_a)
        for p, value in zip(params, (1.0, 0.4, 0.2)):
            p.grad = torch.tensor([value])
        opt.step()
    # window means 0.5, 0.4, 0.2 (a's unbounded step counts 0): a gets 1 (unbounded once) and its
    # mean sets the scale (without it, 0.4 would)
    torch.testing.assert_close(opt.multipliers(), torch.tensor([1.0, 0.8, 0.4]))


@pytest.mark.parametrize("options", OPTIONS[1:], ids=option_id)
def test_state_dict_resume_is_bit_identical(options):
    models = [make_mlp(torch.float32) for _ in range(2)]
    opts = [AutoRGN(torch.optim.AdamW(two_groups(m), lr=1e-2), refresh_every=3, **options) for m in models]
    data = mlp_batches(8, dtype=torch.float32)
    for x, y in data[:4]:  # stop mid-window
        opts[0].zero_grad()
        backward(models[0], x, y)
        opts[0].step()
    models[1].load_state_dict(models[0].state_dict())
    # a deep copy, as torch.save would make: torch's load_state_dict would share the moment tensors
    opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))
    for x, y in data[4:]:
        for model, opt in zip(models, opts):
            opt.zero_grad()
            backward(model, x, y)
            opt.step()
        assert torch.equal(opts[0].multipliers(), opts[1].multipliers())
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


def test_state_dicts_cross_options_and_versions():
    """A checkpoint loads into a wrapper built with other options, and one from before the window's
    participation mask existed loads too; training goes on with finite multipliers in [0, 1]."""
    model = make_mlp(torch.float32)
    opt = AutoRGN(torch.optim.AdamW(two_groups(model), lr=1e-2), refresh_every=3)
    for x, y in mlp_batches(2, dtype=torch.float32):
        opt.zero_grad()
        backward(model, x, y)
        opt.step()
    saved = opt.state_dict()
    older = {**saved, "surgical_optim.AutoRGN": {k: v for k, v in saved["surgical_optim.AutoRGN"].items() if k != "took_part_any"}}
    for state, options in ((saved, {"quantile": 0.5, "per": "group"}), (older, {"max_over": "matrices"})):
        other = AutoRGN(torch.optim.AdamW(two_groups(model), lr=1e-2), refresh_every=3, **options)
        other.load_state_dict(copy.deepcopy(state))
        assert torch.equal(other.multipliers(), opt.multipliers())
        for x, y in mlp_batches(2, seed=5, dtype=torch.float32):
            other.zero_grad()
            backward(model, x, y)
            other.step()
        m = other.multipliers()
        assert torch.isfinite(m).all() and m.min() >= 0 and m.max() == 1


@pytest.mark.parametrize("options", OPTIONS[1:], ids=option_id)
def test_no_host_synchronisation_inside_step(options, device_paths):
    model = make_mlp(torch.float32)
    # SGD: torch's own Adam reads its CPU step counters on the host
    opt = AutoRGN(torch.optim.SGD(two_groups(model), lr=0.1, momentum=0.9), refresh_every=2, **options)
    for x, y in mlp_batches(4, dtype=torch.float32):
        opt.zero_grad()
        backward(model, x, y)
        with host_sync_forbidden():
            opt.step()


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "options, match",
    [
        ({"quantile": 0.0}, r"quantile must be a number in \(0, 1\].*0\.9"),
        ({"quantile": -0.5}, r"quantile must be a number in \(0, 1\]"),
        ({"quantile": 1.5}, r"quantile must be a number in \(0, 1\]"),
        ({"quantile": float("nan")}, r"quantile must be a number in \(0, 1\]"),
        ({"quantile": "0.9"}, r"quantile must be a number in \(0, 1\]"),
        ({"quantile": True}, r"quantile must be a number in \(0, 1\]"),
        ({"quantile": None}, r"quantile must be a number in \(0, 1\]"),
        ({"max_over": "matrix"}, r"max_over must be 'all' or 'matrices'"),
        ({"max_over": None}, r"max_over must be 'all' or 'matrices'"),
        ({"per": "block"}, r"per must be 'tensor' .* or 'group'"),
    ],
)
def test_bad_options_get_clear_errors(options, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        AutoRGN(torch.optim.SGD(model.parameters(), lr=0.1), **options)


def test_quantile_accepts_an_integer_one():
    opt = AutoRGN(torch.optim.SGD(make_model().parameters(), lr=0.1), quantile=1)
    assert opt.quantile == 1.0 and isinstance(opt.quantile, float)


# ------------------------------------------------------------------ FSDP2: the quantile of whole-tensor RGNs
SHARDED_OPTIONS = [{"quantile": 0.5, "max_over": "matrices", "per": "tensor"}, {"quantile": 0.7, "per": "group"}]


def train_sharded_or_not(options: dict, rank: int = 0, world: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Six AdamW steps over two param groups, each rank on its share of every batch (world 1: the
    whole batch, unsharded). Returns the multipliers after each step and the full weights."""
    model = make_mlp(torch.float32)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = AutoRGN(torch.optim.AdamW(two_groups(model), lr=1e-2), **options)
    history = []
    for x, y in mlp_batches(6, dtype=torch.float32):
        share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[share]), y[share]).backward()
        opt.step()
        history.append(opt.multipliers())
    weights = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return history, [w.detach().clone() for w in weights]


def sharded_worker(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        results = [train_sharded_or_not(options, rank, world) for options in SHARDED_OPTIONS]
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_ranks_take_the_quantile_of_whole_tensor_rgns(tmp_path):
    """Two FSDP2 ranks (gloo, CPU): the norms are combined over the shards before the quantile and
    the group norms, so both ranks hold the multipliers of the unsharded single process."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed not built")
    pytest.importorskip("torch.distributed.fsdp")
    import torch.multiprocessing as mp

    mp.spawn(sharded_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for k, options in enumerate(SHARDED_OPTIONS):
        expected_history, expected_weights = train_sharded_or_not(options)
        for step, expected in enumerate(expected_history):
            assert torch.equal(ranks[0][k][0][step], ranks[1][k][0][step]), (options, step)
            torch.testing.assert_close(ranks[0][k][0][step], expected, rtol=1e-4, atol=1e-6)
        assert 0 < expected_history[-1].min() < 1  # the quantile path did scale something
        for got, want in zip(ranks[0][k][1], expected_weights):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
