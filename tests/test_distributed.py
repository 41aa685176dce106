"""DDP and FSDP2: two processes on loopback (gloo, CPU) against single-process training.

Each worker trains on its half of every global batch and saves what it saw; the test compares with a
single process that trains on the whole batch. Under DDP the gradients are all-reduced before
``step()``, so every rank computes the same statistics. Under FSDP2 parameters are DTensor shards:
the wrappers sum squared local norms (and SNR sums) over the mesh with one all-reduce, so the
multipliers and masks equal the unsharded ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from surgical_optim import AutoRGN, AutoSNR

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
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(STEPS)]


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


def worker(rank: int, world: int, mode: str, out_dir: str) -> None:
    # rendezvous through a file, not a port: no clash with other jobs on the machine
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        for kind in sorted(WRAPPERS):  # one process pair for all wrappers: spawning is the slow part
            train_on_half(rank, mode, kind, out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_on_half(rank: int, mode: str, kind: str, out_dir: str) -> None:
    model = make_model()
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    opt = WRAPPERS[kind](torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    history = []
    for x, y in global_batches():
        half = slice(rank * 4, rank * 4 + 4)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[half]), y[half]).backward()
        opt.step()
        history.append(views(opt))
    params = []
    for p in model.parameters():
        params.append(p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone())
    torch.save({"params": params, "history": history}, f"{out_dir}/{kind}_rank{rank}.pt")


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def two_rank_results(request, tmp_path_factory):
    mode = request.param
    if mode == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp")
    out_dir = tmp_path_factory.mktemp(mode)
    mp.spawn(worker, args=(2, mode, str(out_dir)), nprocs=2, join=True)
    return out_dir


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_two_ranks_match_single_process(kind, two_rank_results):
    expected_params, expected_history = single_process(kind)
    ranks = [torch.load(two_rank_results / f"{kind}_rank{r}.pt", weights_only=True) for r in range(2)]
    for step, expected in enumerate(expected_history):
        for key, value in expected.items():
            # every rank holds identical statistics ...
            assert torch.equal(ranks[0]["history"][step][key], ranks[1]["history"][step][key]), (step, key)
            # ... equal to the unsharded, single-process ones
            torch.testing.assert_close(ranks[0]["history"][step][key], value, rtol=1e-4, atol=1e-6)
    for rank in ranks:
        for got, want in zip(rank["params"], expected_params):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
