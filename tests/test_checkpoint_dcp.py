"""Checkpoints through torch.distributed.checkpoint (DCP), the usual path for FSDP2 runs.

``get_optimizer_state_dict`` keeps only an optimizer state dict's ``state`` and ``param_groups``,
``dcp.load`` fills a state dict built from a fresh optimizer (so the two must have the same structure),
and both get and set first initialise an optimizer without state by a step with zero gradients at
learning rate 0. A run resumed this way must continue exactly as the uninterrupted run, as it does
through the wrappers' own ``state_dict()``; and the initialising step must not count as a step of
the wrappers' statistics.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from surgical_optim import AutoRGN, AutoSNR

from test_wrapper_protocol import views

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

if dist.is_available():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

WRAPPERS = {
    "rgn_window": lambda opt: AutoRGN(opt, refresh_every=3),
    "snr": lambda opt: AutoSNR(opt, threshold=0.5, samples=3),
    "snr_refresh": lambda opt: AutoSNR(opt, threshold=0.5, samples=2, refresh_every=4),
    "snr_of_rgn": lambda opt: AutoSNR(AutoRGN(opt, refresh_every=2), threshold=0.3, samples=3),
    "rgn_of_snr": lambda opt: AutoRGN(AutoSNR(opt, threshold=0.3, samples=3), refresh_every=2),
}
STEPS = 7
GLOBAL_BATCH = 8


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    )


def make_optimizer(kind: str, model: torch.nn.Module):
    return WRAPPERS[kind](torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))


def batches(share: slice = slice(None)):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        x, y = torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
        out.append((x[share], y[share]))
    return out


def train(model, opt, data) -> None:
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def innermost(opt):
    while isinstance(opt, (AutoRGN, AutoSNR)):
        opt = opt.optimizer
    return opt


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def outcome(model, opt) -> dict:
    return {"params": [full(p) for p in model.parameters()], "views": views(opt)}


def assert_same_outcome(got: dict, expected: dict) -> None:
    for i, (a, b) in enumerate(zip(got["params"], expected["params"])):
        assert torch.equal(a, b), f"parameter {i}"
    assert got["views"].keys() == expected["views"].keys()
    for name in expected["views"]:
        assert torch.equal(got["views"][name], expected["views"][name]), name


def options(via: str):
    if via == "full":  # whole tensors gathered on rank 0 and broadcast from it when loading
        return StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=True)
    return StateDictOptions()


def save(model, opt, via: str, directory) -> dict | None:
    """Checkpoint ``model``/``opt`` the way ``via`` says; returns the in-memory dicts (or None)."""
    if via == "own_state_dict":  # the wrapper's own format, loaded through set_optimizer_state_dict
        return {"model": get_model_state_dict(model), "optim": copy.deepcopy(opt.state_dict())}
    state = {
        "model": get_model_state_dict(model, options=options(via)),
        "optim": get_optimizer_state_dict(model, opt, options=options(via)),
    }
    if via in ("memory", "full"):
        return copy.deepcopy(state)
    dcp.save(state, checkpoint_id=str(directory))
    return None


def restore(model, opt, via: str, directory, saved: dict | None) -> None:
    if saved is None:  # dcp.load fills a state dict of the same structure, taken from the fresh pair
        saved = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(saved, checkpoint_id=str(directory))
    set_model_state_dict(model, saved["model"], options=options(via))
    set_optimizer_state_dict(model, opt, saved["optim"], options=options(via))


# ---------------------------------------------------------------------------------- single process
CASES = [  # (wrapper, steps before the checkpoint)
    ("rgn_window", 4),  # one step into the second averaging window
    ("snr", 2),  # mid-calibration: the per-element moment sums must travel
    ("snr", 4),  # after calibration, with the mask already applied
    ("snr_refresh", 5),  # one sample into the second estimate
    ("snr_of_rgn", 2),
    ("rgn_of_snr", 2),
]


@pytest.mark.parametrize("via", ["dcp", "memory", "own_state_dict"])
@pytest.mark.parametrize("kind, at", CASES, ids=[f"{k}@{n}" for k, n in CASES])
def test_resume_through_dcp_continues_exactly(kind, at, via, tmp_path, one_thread):
    data = batches()
    model = make_model()
    opt = make_optimizer(kind, model)
    train(model, opt, data)
    expected = outcome(model, opt)

    model = make_model()
    opt = make_optimizer(kind, model)
    train(model, opt, data[:at])
    saved = save(model, opt, via, tmp_path)
    del model, opt
    model = make_model(seed=123)
    opt = make_optimizer(kind, model)
    restore(model, opt, via, tmp_path, saved)
    train(model, opt, data[at:])
    assert_same_outcome(outcome(model, opt), expected)


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_dcp_initialising_a_fresh_optimizer_leaves_the_wrapper_alone(kind, one_thread):
    """A checkpoint taken before the first step initialises the inner optimizer only, exactly as DCP
    does for the bare optimizer: the zero-gradient step is no sample, no RGN, no step of the window."""
    data = batches()
    model = make_model()
    opt = make_optimizer(kind, model)
    get_optimizer_state_dict(model, opt)
    train(model, opt, data)

    reference_model = make_model()
    reference = make_optimizer(kind, reference_model)
    get_optimizer_state_dict(reference_model, innermost(reference))  # what DCP does to the bare one
    train(reference_model, reference, data)
    assert_same_outcome(outcome(model, opt), outcome(reference_model, reference))


@pytest.mark.parametrize("kind", ["rgn_window", "snr"])
def test_dcp_checkpoint_mid_run_of_a_stateless_inner_optimizer_leaves_the_run_alone(kind, one_thread):
    """Plain SGD keeps no state, so DCP initialises it again at every checkpoint, mid-run: a step at
    learning rate 0 that moves nothing, and must not count for the wrapper either."""
    data = batches()
    runs = []
    for checkpoint in (True, False):
        model = make_model()
        opt = WRAPPERS[kind](torch.optim.SGD(model.parameters(), lr=0.1))
        train(model, opt, data[:2])
        opt.zero_grad()  # as a loop that clears gradients after each step (DCP skips models with gradients)
        if checkpoint:
            get_optimizer_state_dict(model, opt)
        train(model, opt, data[2:])
        runs.append(outcome(model, opt))
    assert_same_outcome(*runs)


def test_flattened_optimizer_state_dict_is_refused_with_the_fix():
    """``flatten_optimizer_state_dict=True`` rebuilds param groups from the live optimizer's keys, so
    the wrapper's state could not come back: refuse it when saving, not silently when resuming."""
    model = make_model()
    opt = make_optimizer("snr", model)
    train(model, opt, batches()[:2])
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict=False"):
        get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))


# ---------------------------------------------------------------------------------- FSDP2, two ranks
FSDP_CASES = [  # (wrapper, steps before the checkpoint, how it is taken)
    ("rgn_window", 4, "dcp"),
    ("snr", 2, "dcp"),
    ("snr", 4, "dcp"),
    ("rgn_window", 4, "full"),
    ("snr", 2, "full"),
]
WORLD = 2


def shard(model: torch.nn.Module, world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def fsdp_worker(rank: int, world: int, out_dir: str) -> None:
    # rendezvous through a file, not a port: no clash with other jobs on the machine
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        data = batches(slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world))
        results = {}
        for kind, at, via in FSDP_CASES:
            model = shard(make_model(), world)
            opt = make_optimizer(kind, model)
            train(model, opt, data)
            expected = outcome(model, opt)

            model = shard(make_model(), world)
            opt = make_optimizer(kind, model)
            train(model, opt, data[:at])
            directory = f"{out_dir}/{kind}@{at}-{via}"
            saved = save(model, opt, via, directory)
            model = shard(make_model(seed=123), world)
            opt = make_optimizer(kind, model)
            restore(model, opt, via, directory, saved)
            train(model, opt, data[at:])
            results[f"{kind}@{at}-{via}"] = {"expected": expected, "resumed": outcome(model, opt)}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp")
    out_dir = tmp_path_factory.mktemp("fsdp_dcp")
    # forked, not spawned: a spawned interpreter spends most of this test's time importing torch
    # again (about 30 s against 3 s here); the deadline turns a stuck rank into a failure, not a hang
    ranks = mp.start_processes(fsdp_worker, args=(WORLD, str(out_dir)), nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the FSDP2 ranks did not finish within 120 s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("case", [f"{k}@{n}-{via}" for k, n, via in FSDP_CASES])
def test_fsdp2_resume_through_dcp_continues_exactly(case, fsdp_results):
    """Sharded accumulators (AutoSNR's moment sums are per-rank shards) are saved as shards, or
    gathered whole with ``full_state_dict``; the resumed run reduces the same numbers in the same
    order, so it matches bit for bit."""
    for rank in fsdp_results:
        assert_same_outcome(rank[case]["resumed"], rank[case]["expected"])
