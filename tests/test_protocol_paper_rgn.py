"""auto_rgn_paper (benchmarks/protocol/paper_rgn.py) against a hand-rolled copy of the official code's loop."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from benchmarks.protocol import AutoRGNPaper, ProtocolConfig, finetune
from benchmarks.protocol.paper_rgn import normalised_multipliers

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    """Two convolutions, a BatchNorm named "bn1" (frozen by the default exclude) and one named "norm2" (not
    matched by "bn": it trains, as torchvision's downsample BatchNorms do in the official code)."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 3, padding=1), bn1=nn.BatchNorm2d(4), act1=nn.ReLU(),
        conv2=nn.Conv2d(4, 6, 3, stride=2, padding=1), norm2=nn.BatchNorm2d(6), act2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 3)))
    model.train()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        model(torch.randn(32, 3, 8, 8) * 2 + 1)
        for bn in (model.bn1, model.norm2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    x[:, 0] += y.view(-1, 1, 1).float()
    return x, y


def _official(model: nn.Module, train, *, lr: float, epochs: int, batch: int, seed: int, batches: int,
              exclude: str, wd: float = 1e-4):
    """The official loop written out: per epoch, the RGN of each of the first ``batches`` batches (one
    ``torch.autograd.grad`` per batch, ``.item()`` per tensor), averaged, divided by the max; a new Adam with
    one group per tensor at lr x multiplier; one pass over the epoch's batches. Parameters whose name contains
    ``exclude`` are left out. The batch order is the protocol's: one permutation per epoch from a generator
    seeded once. Returns the weights after every epoch and the multipliers of every epoch."""
    model = copy.deepcopy(model)
    named = [(n, p) for n, p in model.named_parameters() if exclude not in n]
    gen = torch.Generator().manual_seed(seed)
    x, y = train
    states, multipliers = [], []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        chunks = [order[i:i + batch] for i in range(0, len(y), batch)]
        per_batch = []
        for idx in chunks[:batches]:
            grads = torch.autograd.grad(F.cross_entropy(model(x[idx]), y[idx]), [p for _, p in named])
            per_batch.append([torch.norm(g).item() / torch.norm(p).item() for (_, p), g in zip(named, grads)])
        rgn = np.array(per_batch).mean(0)
        weights = rgn / rgn.max()
        multipliers.append(dict(zip([n for n, _ in named], weights.tolist())))
        opt = torch.optim.Adam([{"params": p, "lr": float(w) * lr} for (_, p), w in zip(named, weights)], lr=lr,
                               weight_decay=wd)
        for idx in chunks:
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states, multipliers


class _LastWeights(AutoRGNPaper):
    """Records the weights when training ends (diagnostics is called once, after the last epoch)."""

    def __init__(self, log: list, **options) -> None:
        super().__init__(**options)
        self.log = log

    def setup(self, model, lr, config, make_optimizer):
        self.model = model
        return super().setup(model, lr, config, make_optimizer)

    def diagnostics(self):
        self.log.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return super().diagnostics()


@pytest.mark.parametrize("batches, exclude", [(5, "bn"), (2, "fc")])
def test_three_epochs_equal_the_official_loop(batches, exclude):
    """44 examples in batches of 8 (the last has 4): the multipliers come from the first ``batches`` batches,
    Adam starts afresh every epoch, the excluded parameters never move."""
    model, train = _model(), _data(44, 1)
    epochs, lr = 3, 1e-2
    want, multipliers = _official(model, train, lr=lr, epochs=epochs, batch=8, seed=4, batches=batches,
                                  exclude=exclude)
    log: list = []
    cfg = ProtocolConfig(lrs=(lr,), epochs=epochs, batch_size=8,
                         method_options={"auto_rgn_paper": {"batches": batches, "exclude": exclude}})
    result = finetune(model, lambda: _LastWeights(log, batches=batches, exclude=exclude), train, _data(24, 2),
                      _data(30, 3), config=cfg, seed=4, return_state=True)
    (last,) = log
    for name, tensor in want[-1].items():
        torch.testing.assert_close(last[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(result.state, want[result.epoch - 1], rtol=1e-5, atol=1e-6)
    source = model.state_dict()
    frozen = [n for n, _ in model.named_parameters() if exclude in n]
    assert frozen and all(torch.equal(last[n], source[n]) for n in frozen)
    assert not torch.equal(last["norm2.weight"], source["norm2.weight"])  # a BatchNorm not named "bn": trains
    # the per-block diagnostic: each block's mean multiplier over its trained tensors, averaged over epochs
    reported = result.diagnostics[str(lr)]["block_multipliers"]
    blocks = {n.split(".")[0] for n in multipliers[0]}
    assert set(reported) == blocks
    for block in blocks:
        per_epoch = [np.mean([m for n, m in ms.items() if n.split(".")[0] == block]) for ms in multipliers]
        assert reported[block] == pytest.approx(np.mean(per_epoch), rel=1e-6), block
    assert result.steps == {str(lr): epochs * 6} and result.epochs_run == {str(lr): epochs}


def test_keeping_the_adam_state_would_fail_the_reference():
    """The reference test above tells a fresh Adam every epoch from one that keeps its moments (same
    multipliers): carried-over state gives other weights after the second epoch."""
    model, train = _model(), _data(44, 1)
    fresh, _ = _official(model, train, lr=1e-2, epochs=2, batch=8, seed=4, batches=5, exclude="bn")

    class KeepState(AutoRGNPaper):
        def epoch_optimizer(self, model, optimizer, epoch, epochs, losses):
            new = super().epoch_optimizer(model, optimizer, epoch, epochs, losses)
            if epoch > 0:  # same multipliers, the old moments
                for group, new_group in zip(optimizer.param_groups, new.param_groups):
                    group["lr"] = new_group["lr"]
                return optimizer
            return new

    log: list = []

    class Logged(KeepState, _LastWeights):
        pass

    finetune(model, lambda: Logged(log), train, _data(24, 2), _data(30, 3),
             config=ProtocolConfig(lrs=(1e-2,), epochs=2, batch_size=8), seed=4)
    assert not torch.allclose(log[0]["conv1.weight"], fresh[-1]["conv1.weight"], rtol=1e-4, atol=1e-6)


def test_normalised_multipliers_edge_cases():
    assert normalised_multipliers([2.0, 1.0, 0.5]) == [1.0, 0.5, 0.25]
    # a zero-weight tensor with a gradient (inf) trains at the full lr and does not squash the others
    assert normalised_multipliers([math.inf, 4.0, 1.0]) == [1.0, 1.0, 0.25]
    assert normalised_multipliers([math.nan, 2.0]) == [0.0, 1.0]
    assert normalised_multipliers([0.0, 0.0]) == [0.0, 0.0]


def test_options_are_checked():
    with pytest.raises(TypeError):
        AutoRGNPaper(refresh_every=2)
    with pytest.raises(ValueError):
        AutoRGNPaper(batches=0)
    with pytest.raises(ValueError, match="every parameter"):
        finetune(_model(), "auto_rgn_paper", _data(16, 1), _data(8, 2), _data(8, 3),
                 config=ProtocolConfig(lrs=(1e-2,), epochs=1, batch_size=8,
                                       method_options={"auto_rgn_paper": {"exclude": "."}}))


# ---------------------------------------------------------------------------------------------- data parallel
WORLD = 2
DDP_CONFIG = {"lrs": (1e-2,), "epochs": 2, "batch_size": 16}


def _ddp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(lin=nn.Linear(6, 8), bn=nn.BatchNorm1d(8), act=nn.Tanh(), fc=nn.Linear(8, 3)))


def _ddp_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 6, generator=g)
    x[:, 0] += y.float()
    return x, y


def _ddp_run(distributed: bool) -> dict:
    # 49 = 3 x 16 + 1: the epoch's 4 batches all feed the multipliers, the last one has an empty share
    res = finetune(_ddp_model(), "auto_rgn_paper", _ddp_data(49, 1), _ddp_data(21, 2), _ddp_data(20, 3),
                   config=ProtocolConfig(**DDP_CONFIG, distributed=distributed), seed=1, return_state=True)
    return {"state": res.state, "diagnostics": res.diagnostics, "epoch": res.epoch, "val_acc": res.val_acc}


def _ddp_worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.save(_ddp_run(True), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_ranks_match_one_process(tmp_path):
    """The multipliers come from the all-reduced gradients of the global batches: two ranks train what one
    process trains."""
    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    single = _ddp_run(False)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert (got["epoch"], got["val_acc"]) == (single["epoch"], single["val_acc"])
        torch.testing.assert_close(got["state"], single["state"], rtol=1e-5, atol=1e-6)
        for block, value in single["diagnostics"]["0.01"]["block_multipliers"].items():
            assert got["diagnostics"]["0.01"]["block_multipliers"][block] == pytest.approx(value, rel=1e-5)
    assert torch.equal(single["state"]["bn.weight"], _ddp_model().state_dict()["bn.weight"])
