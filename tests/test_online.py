"""Online adaptation on an unlabeled stream: the losses against hand formulas and explicit loops, the
predict-then-adapt order, surgical selection, and non-finite losses."""

from __future__ import annotations

import math

import pytest
import torch

from surgical_optim import AutoRGN, select_blocks
from surgical_optim.online import adapt_online, entropy, marginal_entropy


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def stream(n: int):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(n)]


def test_entropy_matches_hand_values():
    uniform = torch.zeros(2, 4)
    assert entropy(uniform).item() == pytest.approx(math.log(4))
    certain = torch.tensor([[100.0, 0.0, 0.0]])
    assert entropy(certain).item() == pytest.approx(0.0, abs=1e-30)
    two = torch.tensor([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4
    assert entropy(two).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_entropy_of_low_precision_logits_is_computed_in_float32():
    logits = torch.randn(4, 10).to(torch.bfloat16)
    assert entropy(logits).dtype == torch.float32
    torch.testing.assert_close(entropy(logits), entropy(logits.float()))


def test_marginal_entropy_matches_an_explicit_loop():
    model = make_model()
    inputs = stream(1)[0]
    shifts = iter([0.1, -0.2, 0.3])
    augmented = [inputs + s for s in (0.1, -0.2, 0.3)]
    value = marginal_entropy(model, inputs, lambda x: x + next(shifts), copies=3)
    expected = 0.0
    for i in range(inputs.shape[0]):
        mean_p = sum(torch.softmax(model(a[i : i + 1]), -1)[0] for a in augmented) / 3
        expected += -(mean_p * mean_p.log()).sum().item()
    assert value.item() == pytest.approx(expected / inputs.shape[0], rel=1e-12)


def test_predicts_before_adapting_and_trains_only_the_selected_block():
    model, reference = make_model(), make_model()
    select_blocks(model, [0])  # the first Linear only
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    head_before = model[2].weight.detach().clone()
    for step, (logits, inputs) in enumerate(zip(adapt_online(model, opt, stream(3)), stream(3))):
        # the prediction is the model before this batch's update: replay the updates by hand
        with torch.no_grad():
            torch.testing.assert_close(logits, reference(inputs), rtol=1e-12, atol=1e-12)
        reference.zero_grad()
        entropy(reference(inputs)).backward()
        with torch.no_grad():
            reference[0].weight -= 0.5 * reference[0].weight.grad
            reference[0].bias -= 0.5 * reference[0].bias.grad
    assert step == 2
    assert torch.equal(model[2].weight.detach(), head_before)
    assert not torch.equal(model[0].weight.detach(), make_model()[0].weight.detach())


def test_adapting_lowers_the_entropy_under_autorgn():
    model = make_model()
    opt = AutoRGN(torch.optim.Adam(model.parameters(), lr=5e-2))
    batch = stream(1)[0]
    before = entropy(model(batch)).item()
    for _ in adapt_online(model, opt, [batch] * 30):
        pass
    assert entropy(model(batch)).item() < 0.5 * before


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_leaves_model_and_state_untouched(bad):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = stream(2)
    for _ in adapt_online(model, opt, batches[:1]):
        pass
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    poisoned = batches[1].clone()
    poisoned[0, 0] = bad
    predictions = list(adapt_online(model, opt, [poisoned]))
    assert len(predictions) == 1
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p.detach(), before)
    for key, value in opt.state[model[0].weight].items():
        assert torch.equal(value, state[key])


def test_bad_arguments_name_the_fix():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="augment="):
        next(adapt_online(model, opt, stream(1), loss="marginal_entropy"))
    with pytest.raises(ValueError, match="'entropy' or 'marginal_entropy'"):
        next(adapt_online(model, opt, stream(1), loss="tent"))
