"""AutoRGN on float16 and bfloat16 parameters, on both update paths (per-tensor lr, scaled step) and both Adam branches.

The reference is the paper's formulation run by torch itself: one param group per tensor with
learning rate ``lr x m`` (torch computes its scalar factors in float32 or double and rounds once into
the parameter). After every step our parameters must be within one rounding (one unit in the last
place) of the reference's on the folded path, within two on the snapshot path (which starts from
the inner optimizer's own rounded step), and every tensor the reference moves must move, down to
m = 1e-4.
"""

from __future__ import annotations

import pytest
import torch

import surgical_optim._fold as fold_module
from surgical_optim import AutoRGN
from surgical_optim.auto_rgn_reference import reference_multipliers

#: gradient scale per tensor, relative to the largest; equal weights, so these are the multipliers
GRAD_SCALES = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)

# foreach=True: the kernels the folded update runs (torch's default on accelerators). On the CPU,
# torch's foreach kernels round Python-number hyperparameters such as momentum to the tensors'
# dtype, where its single-tensor loop does not; that difference is torch's, not the fold's.
# eps=1e-6: Adam's default 1e-8 is 0 in float16, and 0/0 follows for a zero gradient, in torch too.
OPTIMIZERS = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, foreach=True),
    "sgd_momentum_wd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-2, foreach=True),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, eps=1e-6, foreach=True),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, eps=1e-6, weight_decay=0.5, foreach=True),
}
#: (base lr, largest gradient) such that m = 1e-4 still moves a weight of 1e-3 by several units in
#: the last place: SGD's step is lr m |g| = lr m^2 |g_max|, Adam's about lr m; Adam's second moment
#: must stay within float16's range (g^2 (1 - beta2) above 6e-8 and below 65504)
SETUP = {"sgd": (1.0, 2e3), "sgd_momentum_wd": (1.0, 2e3), "adam": (0.5, 1e3), "adamw": (0.5, 1e3)}


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of ``x.dtype``'s numbers at ``x`` (in float32), subnormals included."""
    info = torch.finfo(x.dtype)
    magnitude = x.float().abs().clamp(min=info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


def make_params(dtype: torch.dtype, weight: float) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.full((4,), weight, dtype=dtype)) for _ in GRAD_SCALES]


def set_grads(params: list[torch.Tensor], step: int, grad_max: float) -> None:
    # negative gradients: weights grow away from 0, so no result is a cancellation of its update
    pattern = -torch.tensor([1.0, 0.5, 0.25, 0.75]).roll(step) * (1 + 0.1 * step)
    for p, scale in zip(params, GRAD_SCALES):
        p.grad = (pattern * scale * grad_max).to(p.dtype)


def copy_state(opt: torch.optim.Optimizer) -> list[dict]:
    return [{k: v.clone() for k, v in opt.state[p].items()} for p in opt.param_groups[0]["params"]]


def reference_step(name: str, params: list[torch.Tensor], state: list[dict], lr: float, multipliers) -> None:
    """torch's optimizer with one group per tensor and lr x m, from a copy of our state."""
    ref = OPTIMIZERS[name]([{"params": [p], "lr": lr * float(m)} for p, m in zip(params, multipliers)], lr)
    for p, entry in zip(params, state):
        if entry:
            ref.state[p] = entry
    ref.step()


@pytest.mark.parametrize("adam_branch", ["host_step_sizes", "device_step_sizes"])
@pytest.mark.parametrize("update", ["per_tensor_lr", "scaled_step"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_each_step_within_rounding_of_the_per_tensor_lr_reference(dtype, name, update, adam_branch, monkeypatch):
    if adam_branch == "device_step_sizes":  # the branch an accelerator takes, forced on this CPU
        monkeypatch.setattr(fold_module, "host_readable", lambda device: False)
    lr, grad_max = SETUP[name]
    params = make_params(dtype, 1e-3)
    opt = AutoRGN(OPTIMIZERS[name](params, lr), update=update)
    moved = torch.zeros(len(params), dtype=torch.bool)
    # the scaled-step path scales the inner optimizer's own, already rounded, full step: one more
    # rounding (scaled by m) than the fold, which forms lr x m before touching the parameter
    roundings = 1 if update == "per_tensor_lr" else 2
    for step in range(4):
        ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        set_grads(params, step, grad_max)
        set_grads(ref_params, step, grad_max)
        before, state = [p.detach().clone() for p in params], copy_state(opt)
        expected_m = reference_multipliers(params)
        opt.step()
        if update == "per_tensor_lr" and (step > 0 or name == "sgd"):
            assert opt.last_step_folded
        # the multipliers are float32 statistics; the update is checked with the ones used
        torch.testing.assert_close(opt.multipliers(), torch.tensor(expected_m), rtol=1e-5, atol=0)
        reference_step(name, ref_params, state, lr, opt.multipliers())
        for i, (p, r, b) in enumerate(zip(params, ref_params, before)):
            gap = (p.detach().float() - r.detach().float()).abs()
            assert (gap <= roundings * ulp(r.detach())).all(), (step, i, p, r)
            if not torch.equal(r.detach(), b):  # whatever the reference moves, we move
                assert not torch.equal(p.detach(), b), (step, i, expected_m[i])
                moved[i] = True
    assert moved.all()  # every tensor, down to m = 1e-4, moved at some step


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_folded_adamw_decay_factor_is_not_rounded_to_the_parameter_dtype(dtype):
    """1 - lr wd = 0.9975 is 0.99609 in bfloat16: rounding the factor first decays 3.0 to 2.984
    (3 x 0.99609 = 2.988), where torch's AdamW keeps 3.0 (3 x 0.9975 = 2.9925 rounds to 3.0)."""
    frozen = torch.nn.Parameter(torch.full((2,), 3.0, dtype=dtype))
    p = torch.nn.Parameter(torch.full((2,), 3.0, dtype=dtype))
    ref_p = torch.nn.Parameter(torch.full((2,), 3.0, dtype=dtype))
    opt = AutoRGN(torch.optim.AdamW([frozen, p], lr=0.0025, eps=1e-6, weight_decay=1.0), update="per_tensor_lr")
    # torch's single-tensor AdamW forms its factor in float32 (its CPU foreach kernels round it)
    ref = torch.optim.AdamW([ref_p], lr=0.0025, eps=1e-6, weight_decay=1.0, foreach=False)
    for _ in range(2):  # the second step folds (the first creates the state)
        frozen.grad = torch.zeros_like(frozen)  # RGN 0: m = 0, so p has m = 1
        p.grad, ref_p.grad = torch.ones_like(p), torch.ones_like(ref_p)
        opt.step()
        ref.step()
    assert opt.last_step_folded
    assert torch.equal(frozen.detach(), torch.full_like(frozen, 3.0))
    assert torch.equal(p.detach(), ref_p.detach()), (p, ref_p)
