"""torch.compile: the wrappers' step() compiles without graph breaks of ours and without recompiling."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from surgical_optim import AutoRGN, AutoSNR

WRAPPERS = {
    "rgn": lambda inner: AutoRGN(inner),
    "rgn_window": lambda inner: AutoRGN(inner, refresh_every=2),
    "snr": lambda inner: AutoSNR(inner, threshold=0.3, samples=2),
}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 8, generator=g) for _ in range(n)]


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_step_compiles_once_and_breaks_only_where_torch_optimizers_do(kind):
    model = make_model()
    opt = WRAPPERS[kind](torch.optim.AdamW(model.parameters(), lr=1e-2))
    torch._dynamo.reset()
    counters.clear()
    compiled_per_step = []
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    @torch.compile(backend=counting_backend)
    def step():
        opt.step()

    for x in batches(10):
        opt.zero_grad()
        model(x).sum().backward()
        before = len(graphs)
        step()
        compiled_per_step.append(len(graphs) - before)
    # warm-up (first step, first cached plan, end of AutoSNR's estimate) may compile; then nothing
    assert sum(compiled_per_step[4:]) == 0, compiled_per_step
    if isinstance(opt, AutoRGN):
        assert opt.last_step_folded  # the folded AdamW update is what was compiled
    # the only breaks are torch.optim's own deliberate graph_break() around the inner step
    reasons = list(counters["graph_break"])
    assert reasons and all("torch._dynamo.graph_break()" in reason for reason in reasons), reasons


INNER = {
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1),
    # a large eps: compiled and eager Adam legitimately differ where |g| ~ eps (first step ~ sign(g))
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, eps=1e-3),
}


@pytest.mark.parametrize("inner", sorted(INNER))
@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_compiled_step_matches_eager(kind, inner):
    eager_model, compiled_model = make_model(), make_model()
    eager = WRAPPERS[kind](INNER[inner](eager_model.parameters()))
    compiled = WRAPPERS[kind](INNER[inner](compiled_model.parameters()))
    torch._dynamo.reset()
    compiled_step = torch.compile(compiled.step, backend="aot_eager")
    for x in batches(6):
        for model, opt, step in ((eager_model, eager, eager.step), (compiled_model, compiled, compiled_step)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            step()
    if isinstance(compiled, AutoRGN):
        assert compiled.last_step_folded and eager.last_step_folded
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
