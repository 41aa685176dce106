"""AutoRGN with sparse gradients (``nn.Embedding(sparse=True)``) under the optimizers torch lets
take them: SGD, Adagrad and SparseAdam. The fold's kernels are dense, so sparse steps take the
snapshot path; the result must equal the paper's one-param-group-per-tensor formulation."""

from __future__ import annotations

import pytest
import torch

from surgical_optim import AutoRGN
from surgical_optim.auto_rgn_reference import per_tensor_lr_step

OPTIMIZERS = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "sgd_momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adagrad": lambda params, lr: torch.optim.Adagrad(params, lr=lr),
    "sparse_adam": lambda params, lr: torch.optim.SparseAdam(params, lr=lr),
}


class Bag(torch.nn.Module):
    """Two sparse embeddings of different scales (so their multipliers differ), summed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.small = torch.nn.Embedding(10, 4, sparse=True)
        self.large = torch.nn.Embedding(10, 4, sparse=True)
        with torch.no_grad():
            self.large.weight.mul_(5.0)
        self.double()  # float64: the comparison below is then exact to 1e-10

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return (self.small(tokens) * self.large(tokens)).sum(-1)


def batches(n: int):
    g = torch.Generator().manual_seed(3)
    # repeated tokens within a batch: uncoalesced gradients
    return [(torch.randint(0, 6, (8,), generator=g), torch.randn(8, generator=g, dtype=torch.float64)) for _ in range(n)]


def loss(model: torch.nn.Module, tokens, target) -> torch.Tensor:
    return ((model(tokens) - target) ** 2).mean()


@pytest.mark.parametrize("update", ["auto", "scaled_step"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sparse_gradients_equal_one_param_group_per_tensor(name, update):
    model, ref_model = Bag(), Bag()
    opt = AutoRGN(OPTIMIZERS[name](list(model.parameters()), 0.1), update=update)
    ref_params = list(ref_model.parameters())
    ref = OPTIMIZERS[name]([{"params": [p]} for p in ref_params], 0.1)
    for tokens, target in batches(4):
        opt.zero_grad()
        ref.zero_grad()
        loss(model, tokens, target).backward()
        loss(ref_model, tokens, target).backward()
        assert model.small.weight.grad.is_sparse
        opt.step()
        expected = per_tensor_lr_step(ref, ref_params, 0.1)
        assert not opt.last_step_folded
        torch.testing.assert_close(opt.multipliers(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)
        assert 0 < min(expected) < 1  # the two tensors really get different learning rates
        for a, b in zip(model.parameters(), ref_params):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_non_finite_sparse_gradient_never_corrupts():
    model = Bag()
    opt = AutoRGN(torch.optim.Adagrad(model.parameters(), lr=0.1))
    tokens, target = batches(1)[0]
    loss(model, tokens, target).backward()
    grad = model.small.weight.grad.coalesce()
    grad.values()[0, 0] = float("nan")
    model.small.weight.grad = grad
    before = model.small.weight.detach().clone()
    opt.step()
    assert opt.multipliers()[0] == 0
    assert torch.equal(model.small.weight.detach(), before)
    assert torch.isfinite(opt.state[model.small.weight]["sum"]).all()
    assert not torch.equal(model.large.weight.detach(), Bag().large.weight.detach())  # the other trains
