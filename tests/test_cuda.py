"""Checks that need a CUDA device (skipped without one; ``benchmarks/gpu_check.sh`` runs them).

On an accelerator the folded Adam update keeps its step sizes on the device, and factors travel as
0-d device tensors, which CUDA kernels may round to the parameters' dtype where CPU kernels read
them at full precision: the low-precision guarantee is checked here on the device itself.
"""

from __future__ import annotations

import pytest
import torch

from surgical_optim import AutoRGN

from test_low_precision import GRAD_SCALES, OPTIMIZERS, SETUP, copy_state, reference_step, ulp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("update", ["per_tensor_lr", "scaled_step"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_steps_on_cuda_follow_the_per_tensor_lr_reference(dtype, name, update):
    lr, grad_max = SETUP[name]
    params = [torch.nn.Parameter(torch.full((4,), 1e-3, dtype=dtype, device="cuda")) for _ in GRAD_SCALES]
    opt = AutoRGN(OPTIMIZERS[name](params, lr), update=update)
    roundings = 1 if update == "per_tensor_lr" else 2
    for step in range(4):
        pattern = -torch.tensor([1.0, 0.5, 0.25, 0.75], device="cuda").roll(step) * (1 + 0.1 * step)
        ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, r, scale in zip(params, ref_params, GRAD_SCALES):
            p.grad = (pattern * scale * grad_max).to(dtype)
            r.grad = p.grad.clone()
        before, state = [p.detach().clone() for p in params], copy_state(opt)
        opt.step()
        if update == "per_tensor_lr" and (step > 0 or name == "sgd"):
            assert opt.last_step_folded
        reference_step(name, ref_params, state, lr, opt.multipliers().cpu())
        for i, (p, r, b) in enumerate(zip(params, ref_params, before)):
            gap = (p.detach().float() - r.detach().float()).abs()
            assert (gap <= roundings * ulp(r.detach())).all(), (step, i, p, r)
            if not torch.equal(r.detach(), b):
                assert not torch.equal(p.detach(), b), (step, i)
