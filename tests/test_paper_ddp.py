"""Data-parallel runs (DDP): two processes on loopback (gloo, CPU) against one process.

One spawned pair does everything (spawning is the slow part): ``protocol.finetune`` on tiny tensors and
on a Dataset (the DataLoader path), with a global batch of 16 over 2 ranks and a last batch of 1 (so one
rank's share is empty), with a file rendezvous; then the paper harness CLI launched the way torchrun
does (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1``/``MASTER_PORT`` (a free port)
in the environment; the harness initialises the process group itself).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks import paper
from benchmarks.runs import read_results
from benchmarks.protocol import ProtocolConfig, finetune

try:  # fixture data and the tiny model of the harness tests
    from test_paper_harness import _cifar10c_args
except ImportError:  # tests/ imported as a package
    from tests.test_paper_harness import _cifar10c_args

WORLD = 2
#: "all" (whole model), "4" (the last Linear: frozen-prefix precompute, DDP wraps the suffix),
#: gradual unfreezing (the DDP wrapper is rebuilt when the trained set grows), L1-SP (a penalty outside DDP),
#: Auto-RGN and Auto-SNR (statistics of the all-reduced gradients)
METHODS = ("all", "4", "gradual_last_first", "l1_sp", "auto_rgn", "auto_snr")
CONFIG = {"lrs": (3e-2, 1e-3), "epochs": 3, "batch_size": 16, "eval_batch_size": 8}


#: batch sizes the last layer saw in this process: (training, grad enabled) and (evaluation)
SEEN: dict[bool, list[int]] = {True: [], False: []}


def _record(module, inputs, output) -> None:
    SEEN[torch.is_grad_enabled()].append(inputs[0].shape[0])


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    model[4].register_forward_hook(_record)  # copied with the model by finetune
    return model


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 6, generator=g)
    x[:, 0] += y.float()
    return x, y, torch.arange(n) % 2


def _splits(as_dataset: bool):
    train = _data(49, 1)[:2]  # 49 = 3 * 16 + 1: the last global batch has one example
    val, test = _data(21, 2), _data(30, 3)  # groups: worst-group accuracy is gathered too
    return (TensorDataset(*train) if as_dataset else train), val, test


def _runs(**overrides) -> dict[str, dict]:
    out = {}
    for as_dataset in (False, True):
        for method in METHODS:
            for sizes in SEEN.values():
                sizes.clear()
            res = finetune(_model(), method, *_splits(as_dataset), config=ProtocolConfig(**CONFIG, **overrides),
                           seed=3, return_state=True)
            out[f"{method}/{'dataset' if as_dataset else 'tensors'}"] = {
                "lr": res.lr, "epoch": res.epoch, "val_acc": res.val_acc, "val_loss": res.val_loss,
                "test_acc": res.test_acc, "worst": res.worst_group_acc, "curves": res.val_curves,
                "prefix": res.precomputed_prefix, "state": res.state,
                "train_sizes": list(SEEN[True]), "eval_examples": sum(SEEN[False]),
            }
    return out


def _worker(rank: int, port: int, out_dir: str, cli_args: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.save(_runs(), f"{out_dir}/protocol_rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # the harness as torchrun starts it: it initialises (env://, on loopback) and destroys the process group
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert paper.main(cli_args) == 0
    assert not dist.is_initialized()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cli = _cifar10c_args(tmp, corruptions="fog", methods="none,all,last")
    cli = [a if a != "0,1" else "0" for a in cli]  # one seed: none + (all, last) x 2 lrs = 5 runs
    mp.spawn(_worker, args=(_free_port(), str(tmp), cli), nprocs=WORLD, join=True)
    return tmp, cli


pytestmark = pytest.mark.usefixtures("one_thread")


def test_finetune_two_ranks_match_one_process(two_ranks):
    tmp, _ = two_ranks
    ranks = [torch.load(tmp / f"protocol_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = _runs(distributed=False)
    assert set(ranks[0]) == set(single)
    assert single["4/tensors"]["prefix"] == 2 and ranks[0]["4/tensors"]["prefix"] == 2
    for key, want in single.items():
        # every rank trained on its share of each global batch (16 = 8 + 8, the last 1 = 1 + 0) ...
        epochs = CONFIG["epochs"] * len(CONFIG["lrs"])
        assert want["train_sizes"] == [16, 16, 16, 1] * epochs, key
        assert ranks[0][key]["train_sizes"] == [8, 8, 8, 1] * epochs, key
        assert ranks[1][key]["train_sizes"] == [8, 8, 8, 0] * epochs, key
        # ... and evaluated whole batches of its own (val and test split over the ranks; every rank runs the
        # check of the stage split of tensor data: 8 examples through the model and through its stages)
        probe = 2 * 8 if key.endswith("tensors") else 0
        assert ranks[0][key]["eval_examples"] + ranks[1][key]["eval_examples"] == want["eval_examples"] + probe, key
        assert 0 < ranks[1][key]["eval_examples"] < ranks[0][key]["eval_examples"] < want["eval_examples"], key
        for got in ranks:
            assert (got[key]["lr"], got[key]["epoch"]) == (want["lr"], want["epoch"]), key
            assert got[key]["val_acc"] == want["val_acc"] and got[key]["test_acc"] == want["test_acc"], key
            assert got[key]["worst"] == want["worst"], key
            assert got[key]["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5), key
            for lr, curve in want["curves"].items():
                assert got[key]["curves"][lr] == curve, (key, lr)
            for name, tensor in want["state"].items():
                torch.testing.assert_close(got[key]["state"][name], tensor, rtol=1e-5, atol=1e-5, msg=f"{key} {name}")
        # every rank returns the same weights
        for name, tensor in ranks[0][key]["state"].items():
            assert torch.equal(tensor, ranks[1][key]["state"][name]), (key, name)


def test_harness_under_two_ranks_writes_once(two_ranks, tmp_path):
    tmp, cli = two_ranks
    out = tmp / "out"
    files = sorted(p.name for p in (out / "results").iterdir())
    assert files == ["runs-shard0of1.jsonl"]
    records = read_results(out / "results")
    assert len(records) == 5 and len({r["run_id"] for r in records}) == 5  # written by rank 0 only
    assert {r["method"] for r in records} == {"none", "all", "block:fc"}
    assert all(r["world_size"] == WORLD for r in records)
    assert (out / "table.md").is_file()
    # the same sweep in one process selects the same epochs and reaches the same accuracies
    single_out = tmp_path / "single"
    assert paper.main([a if a != str(out) else str(single_out) for a in cli]) == 0
    single = {r["run_id"]: r for r in read_results(single_out / "results")}
    assert set(single) == {r["run_id"] for r in records}  # world size is not part of a run's identity
    for r in records:
        want = single[r["run_id"]]
        assert r["best"]["epoch"] == want["best"]["epoch"]
        assert r["best"]["val_acc"] == pytest.approx(want["best"]["val_acc"], abs=1e-9)
        assert r["best"]["test_acc"] == pytest.approx(want["best"]["test_acc"], abs=1e-9)
        assert r["best"]["test_loss"] == pytest.approx(want["best"]["test_loss"], rel=1e-5)
