"""DDP, FSDP2 and HSDP: processes on loopback (gloo, CPU) against single-process training.

Each worker trains on its share of every global batch and saves what it saw; the test compares with
a single process that trains on the whole batch. Under DDP (two ranks) the gradients are all-reduced
before ``step()``, so every rank computes the same statistics. Under FSDP2 (two ranks, a 1-D mesh)
parameters are DTensor shards: the wrappers sum squared local norms (and SNR sums) over the mesh with
one all-reduce, so the multipliers and masks equal the unsharded ones. HSDP (four ranks, a 2 x 2 mesh:
replicate x shard) must sum over the shard dimension only; summing over all four ranks would count
every shard twice.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from surgical_optim import AutoRGN, AutoSNR
from surgical_optim._foreach import GatherPlan, combine_shard_norms, local_norms

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

STEPS = 6
WRAPPERS = {
    "rgn": lambda opt: AutoRGN(opt),
    "snr": lambda opt: AutoSNR(opt, threshold=0.5, samples=3),
    "snr_rgn": lambda opt: AutoSNR(AutoRGN(opt), threshold=0.3, samples=2),
}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    )


def global_batches():
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g))
        for _ in range(STEPS)
    ]


def views(opt) -> dict[str, torch.Tensor]:
    out = {}
    for layer in (opt, getattr(opt, "optimizer", None)):
        if isinstance(layer, AutoRGN):
            out["multipliers"] = layer.multipliers()
            # the folded AdamW update on local shards, as in the single process (from step 2 on)
            out["folded"] = torch.tensor(layer.last_step_folded)
        if isinstance(layer, AutoSNR):
            out["mask"] = layer.mask()
    return out


def single_process(kind: str):
    model = make_model()
    opt = WRAPPERS[kind](torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    history = []
    for x, y in global_batches():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        history.append(views(opt))
    return [p.detach().clone() for p in model.parameters()], history


WORLD = {"ddp": 2, "fsdp2": 2, "hsdp": 4}
GLOBAL_BATCH = 8


def worker(rank: int, world: int, mode: str, out_dir: str) -> None:
    # rendezvous through a file, not a port: no clash with other jobs on the machine
    # a bounded timeout: a collective that ranks disagree on fails the test instead of hanging it
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        for kind in sorted(WRAPPERS):  # one process pair for all wrappers: spawning is the slow part
            train_on_share(rank, world, mode, kind, out_dir)
        if mode != "ddp":
            uneven_gradients(rank, world, mode, out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def distribute(model: torch.nn.Module, mode: str, world: int) -> torch.nn.Module:
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mode == "fsdp2":
        mesh = init_device_mesh("cpu", (world,))
    else:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def uneven_gradients(rank: int, world: int, mode: str, out_dir: str) -> None:
    """Ranks that disagree on which parameters have gradients: rank 1 drops one gradient at step 1
    and all of them at step 2. The statistics' all-reduce must keep one shape on every rank."""
    model = distribute(make_model(), mode, world)
    opt = AutoRGN(torch.optim.AdamW(model.parameters(), lr=1e-2))
    history = []
    for step, (x, y) in enumerate(global_batches()[:4]):
        share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[share]), y[share]).backward()
        if rank == 1 and step in (1, 2):
            for p in list(model.parameters())[: 1 if step == 1 else None]:
                p.grad = None
        opt.step()
        history.append(opt.multipliers())
    torch.save(history, f"{out_dir}/uneven_rank{rank}.pt")


def train_on_share(rank: int, world: int, mode: str, kind: str, out_dir: str) -> None:
    model = distribute(make_model(), mode, world)
    opt = WRAPPERS[kind](torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    history = []
    for x, y in global_batches():
        share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[share]), y[share]).backward()
        opt.step()
        history.append(views(opt))
    params = []
    for p in model.parameters():
        params.append(p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone())
    # the statistics are ratios, blind to a shard counted twice (both norms would double): check the
    # norms themselves, as the wrappers compute them from local shards
    trained = list(model.parameters())
    plan = GatherPlan(trained, torch.device("cpu"))
    (norms,) = combine_shard_norms(plan, local_norms(plan, [trained], torch.float32))
    torch.save({"params": params, "history": history, "norms": norms}, f"{out_dir}/{kind}_rank{rank}.pt")


@pytest.fixture(scope="module", params=sorted(WORLD))
def rank_results(request, tmp_path_factory):
    mode = request.param
    if mode != "ddp":
        pytest.importorskip("torch.distributed.fsdp")
    out_dir = tmp_path_factory.mktemp(mode)
    mp.spawn(worker, args=(WORLD[mode], mode, str(out_dir)), nprocs=WORLD[mode], join=True)
    return out_dir, WORLD[mode]


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_ranks_match_single_process(kind, rank_results):
    out_dir, world = rank_results
    expected_params, expected_history = single_process(kind)
    ranks = [torch.load(out_dir / f"{kind}_rank{r}.pt", weights_only=True) for r in range(world)]
    for step, expected in enumerate(expected_history):
        for key, value in expected.items():
            # every rank holds identical statistics ...
            for other in ranks[1:]:
                assert torch.equal(ranks[0]["history"][step][key], other["history"][step][key]), (step, key)
            # ... equal to the unsharded, single-process ones
            torch.testing.assert_close(ranks[0]["history"][step][key], value, rtol=1e-4, atol=1e-6)
    for rank in ranks:
        for got, want in zip(rank["params"], expected_params):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        expected_norms = torch.stack([p.norm() for p in rank["params"]])
        torch.testing.assert_close(rank["norms"], expected_norms, rtol=1e-5, atol=1e-6)


def test_ranks_without_some_gradients_still_meet_in_the_collective(rank_results):
    out_dir, world = rank_results
    if not (out_dir / "uneven_rank0.pt").exists():
        pytest.skip("DDP all-reduces gradients itself; the wrappers run no collective there")
    histories = [torch.load(out_dir / f"uneven_rank{r}.pt", weights_only=True) for r in range(world)]
    for history in histories:
        for multipliers in history:
            assert torch.isfinite(multipliers).all() and multipliers.max() == 1
    # step 0, every gradient everywhere: every rank computes the same multipliers
    for other in histories[1:]:
        assert torch.equal(histories[0][0], other[0])
    # step 3, again every gradient, after rank 1 skipped two updates (so HSDP's replicas now
    # differ): ranks of one shard group (0 and 1; 2 and 3) met in one all-reduce and agree
    for first in range(0, world, 2):
        assert torch.equal(histories[first][3], histories[first + 1][3])
