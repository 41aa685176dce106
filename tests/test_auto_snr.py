"""AutoSNR against a slow reference; freezing semantics; estimators."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgical_optim import AutoRGN, AutoSNR, per_example_gradient_snr
from surgical_optim.auto_snr_reference import ReferenceAutoSNR, reference_tensor_snr
from surgical_optim.snr import official_eb_criterion


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).to(dtype)


def batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float64, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def backward(model, x, y):
    torch.nn.functional.cross_entropy(model(x), y).backward()


def signal_and_noise_grads(params, kinds, generator):
    """'signal': the same gradient every step up to 1% noise (high SNR); 'noise': pure noise (low)."""
    for p, kind in zip(params, kinds):
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        p.grad = 1.0 + 0.01 * noise if kind == "signal" else noise


def run_steps(opt, params, kinds, generator, steps):
    """Steps with fresh gradients; returns, per step, which tensors moved."""
    moved = []
    for _ in range(steps):
        signal_and_noise_grads(params, kinds, generator)
        before = [p.detach().clone() for p in params]
        opt.step()
        moved.append([not torch.equal(p, b) for p, b in zip(params, before)])
    return moved


class SignalNoise(torch.nn.Module):
    """Per example, the gradient of ``signal`` is all ones and that of ``noise`` is the input."""

    def __init__(self) -> None:
        super().__init__()
        self.signal = torch.nn.Parameter(torch.zeros(30))
        self.noise = torch.nn.Parameter(torch.zeros(30))

    def forward(self, x):
        return self.signal.sum() + (self.noise * x).sum(-1)


def step_both_and_compare(fast, fast_model, ref, ref_model, x, y) -> None:
    """One step of AutoSNR and of its slow reference on the same batch; the weights must agree."""
    fast.zero_grad()
    backward(fast_model, x, y)
    fast.step()
    ref.optimizer.zero_grad()
    backward(ref_model, x, y)
    ref.step()
    for a, b in zip(fast_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# each threshold gives a different mask on this model (0.05 and 0.7 would repeat 0 and 1)
@pytest.mark.parametrize("threshold", [0.0, 0.12, 0.3, 0.45, 1.0])
@pytest.mark.parametrize("inner", ["adamw", "sgd"])
def test_matches_reference(threshold, inner):
    make = (
        (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))
        if inner == "adamw"
        else (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2))
    )
    fast_model, ref_model = make_model(), make_model()
    fast = AutoSNR(make(fast_model.parameters()), threshold=threshold, samples=4)
    ref = ReferenceAutoSNR(make(ref_model.parameters()), threshold=threshold, samples=4)
    for step, (x, y) in enumerate(batches(9)):
        step_both_and_compare(fast, fast_model, ref, ref_model, x, y)
        if step >= 3:
            torch.testing.assert_close(fast.snr(), torch.tensor(ref.normalised, dtype=torch.float64), rtol=1e-9, atol=1e-12)
            assert fast.mask().tolist() == [float(k) for k in ref.keep]
    # the comparison above covered freezing: some tensors frozen and some trained unless threshold 0
    assert ref.keep is not None and all(ref.keep) == (threshold == 0.0) and any(ref.keep)


def test_threshold_zero_is_the_bare_optimizer():
    wrapped_model, bare_model = make_model(dtype=torch.float32), make_model(dtype=torch.float32)
    wrapped = AutoSNR(torch.optim.AdamW(wrapped_model.parameters(), lr=1e-2, weight_decay=0.1), threshold=0.0, samples=2)
    bare = torch.optim.AdamW(bare_model.parameters(), lr=1e-2, weight_decay=0.1)
    for x, y in batches(6, dtype=torch.float32):
        for model, opt in ((wrapped_model, wrapped), (bare_model, bare)):
            opt.zero_grad()
            backward(model, x, y)
            opt.step()
    for a, b in zip(wrapped_model.parameters(), bare_model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(wrapped.mask(), torch.ones(6))


def test_frozen_tensors_do_not_move_and_state_does_not_advance():
    model = make_model(dtype=torch.float32)
    opt = AutoSNR(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5), threshold=1.0, samples=3)
    data = batches(8, dtype=torch.float32)
    for x, y in data[:3]:
        opt.zero_grad()
        backward(model, x, y)
        opt.step()
    mask = opt.mask()
    assert mask.sum() == 1  # threshold 1 keeps only the highest-SNR tensor
    params = list(model.parameters())
    frozen = [p for p, m in zip(params, mask) if m == 0]
    weights = [p.detach().clone() for p in frozen]
    steps = [opt.state[p]["step"].clone() for p in frozen]
    averages = [opt.state[p]["exp_avg"].clone() for p in frozen]
    for x, y in data[4:]:
        opt.zero_grad()
        backward(model, x, y)
        opt.step()
    kept = params[int(mask.argmax())]
    kept_before = kept.detach().clone()
    for x, y in data[3:4]:
        opt.zero_grad()
        backward(model, x, y)
        opt.step()
    assert not torch.equal(kept, kept_before)
    for p, w, s, a in zip(frozen, weights, steps, averages):
        assert torch.equal(p.detach(), w)  # no weight-decay drift
        assert torch.equal(opt.state[p]["step"], s)
        assert torch.equal(opt.state[p]["exp_avg"], a)
    assert len(opt.state_dict()["state"]) == len(params)  # every parameter stays in the optimizer


def test_samples_estimator_matches_loop_reference_per_tensor():
    torch.manual_seed(0)
    samples = [torch.randn(4, 3, dtype=torch.float64) + 0.5 for _ in range(6)]
    total = sum(samples)
    squares = sum(s * s for s in samples)
    from surgical_optim.snr import snr_from_moments

    fast = snr_from_moments([total], [squares], [6])
    assert fast.item() == pytest.approx(reference_tensor_snr(samples), rel=1e-10)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(2, 6),
    st.lists(st.integers(1, 5), min_size=1, max_size=5),
    st.integers(0, 2**16),
    st.floats(0.0, 1.0),
)
def test_property_snr_and_mask_match_the_reference(samples, sizes, seed, threshold):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, dtype=torch.float64)) for n in sizes]
    opt = AutoSNR(torch.optim.SGD(params, lr=0.01), threshold=threshold, samples=samples)
    history: list[list[torch.Tensor]] = [[] for _ in params]
    for step in range(samples + 1):
        for p, seen in zip(params, history):
            # some tensors: pure noise, some: constant signal, some: exactly zero
            kind = p.numel() % 3
            p.grad = torch.randn_like(p) if kind == 0 else (torch.ones_like(p) + 0.1 * torch.randn_like(p) if kind == 1 else torch.zeros_like(p))
            if step < samples:
                seen.append(p.grad.clone())
        before = [p.detach().clone() for p in params]
        opt.step()
    raw = [reference_tensor_snr(seen) for seen in history]
    expected = [r / max(raw) if max(raw) > 0 else 0.0 for r in raw]
    snr = opt.snr()
    torch.testing.assert_close(snr, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    keep = [e >= threshold for e in expected]
    assert opt.mask().tolist() == [float(k) for k in keep]
    # the last step ran under the mask: frozen tensors stayed, trained ones with a gradient moved
    for p, b, k in zip(params, before, keep):
        assert torch.equal(p, b) == (not k or p.numel() % 3 == 2)


def test_signal_tensor_kept_noise_tensor_frozen():
    torch.manual_seed(0)
    signal = torch.nn.Parameter(torch.zeros(50))
    noise = torch.nn.Parameter(torch.zeros(50))
    opt = AutoSNR(torch.optim.SGD([signal, noise], lr=0.0), threshold=0.5, samples=8)
    for _ in range(8):
        signal.grad = 1.0 + 0.1 * torch.randn(50)
        noise.grad = torch.randn(50)
        opt.step()
    assert opt.mask().tolist() == [1.0, 0.0]
    # independent of gradient scale
    raw = opt.raw_snr()
    opt2 = AutoSNR(torch.optim.SGD([signal, noise], lr=0.0), threshold=0.5, samples=8)
    torch.manual_seed(0)
    for _ in range(8):
        signal.grad = 1e-6 * (1.0 + 0.1 * torch.randn(50))
        noise.grad = 1e-6 * torch.randn(50)
        opt2.step()
    torch.testing.assert_close(opt2.raw_snr(), raw, rtol=1e-4, atol=0)


def test_mask_applies_from_the_step_after_estimation():
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(10))]
    opt = AutoSNR(torch.optim.SGD(params, lr=1.0), threshold=0.5, samples=2)
    moved = run_steps(opt, params, ["signal", "noise"], generator, 4)
    assert moved == [[True, True]] * 2 + [[True, False]] * 2  # steps 0 and 1 collect and train everything


def test_refresh_every_reestimates():
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(20)), torch.nn.Parameter(torch.zeros(20))]
    opt = AutoSNR(torch.optim.SGD(params, lr=0.1), threshold=0.5, samples=3, refresh_every=5)
    assert run_steps(opt, params, ["signal", "noise"], generator, 5) == [[True, True]] * 3 + [[True, False]] * 2
    assert opt.mask().tolist() == [1.0, 0.0]
    # the roles swap: steps 5-7 collect under the old mask, which stays in force until the new one
    assert run_steps(opt, params, ["noise", "signal"], generator, 5) == [[True, False]] * 3 + [[False, True]] * 2
    assert opt.mask().tolist() == [0.0, 1.0]


def official_eb_loop(g: torch.Tensor) -> float:
    """The official statistic written out: per position after the first axis, the unbiased variance
    over that axis; mean over all elements of g^2 / (variance + 1e-8)."""
    rows = g.reshape(g.shape[0], -1).T.tolist()  # one list per column, over the first axis
    total = 0.0
    for column in rows:
        mean = sum(column) / len(column)
        variance = sum((v - mean) ** 2 for v in column) / (len(column) - 1)
        total += sum(v * v / (variance + 1e-8) for v in column)
    return total / g.numel()


def test_official_eb_criterion_matches_hand_values_and_a_loop():
    # columns (1, 3) and (2, 4) both have unbiased variance 2: mean of (1, 4, 9, 16) / 2 = 3.75
    # (a biased variance would give 7.5, the variance over the other axis 15)
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    assert official_eb_criterion(g).item() == pytest.approx(3.75, rel=1e-8)
    torch.manual_seed(0)
    g = torch.randn(5, 4, 2, dtype=torch.float64)
    assert official_eb_criterion(g).item() == pytest.approx(official_eb_loop(g), rel=1e-12)
    assert torch.isnan(official_eb_criterion(torch.randn(1, 3)))


def test_official_eb_estimator_raw_threshold_and_nan_kept():
    generator = torch.Generator().manual_seed(0)
    low = torch.nn.Parameter(torch.zeros(4, 3))  # zero-mean columns: exactly (4 - 1) / 4 = 0.75 < 0.95
    high = torch.nn.Parameter(torch.zeros(4, 3))  # near-constant: about 100
    scalar_like = torch.nn.Parameter(torch.zeros(1, 3))  # first axis of length 1: NaN, kept as in the code
    params = [low, high, scalar_like]
    opt = AutoSNR(torch.optim.SGD(params, lr=0.1), threshold=0.95, estimator="official_eb", samples=5)
    values = []
    for _ in range(6):
        noise = torch.randn(4, 3, generator=generator)
        low.grad = noise - noise.mean(0)
        high.grad = 1.0 + 0.1 * torch.randn(4, 3, generator=generator)
        scalar_like.grad = torch.randn(1, 3, generator=generator)
        values.append(official_eb_loop(high.grad))
        before = [p.detach().clone() for p in params]
        opt.step()
    raw = opt.snr()
    assert raw[0].item() == pytest.approx(0.75, rel=1e-6)
    assert raw[1].item() == pytest.approx(sum(values[:5]) / 5, rel=1e-5)
    assert torch.isnan(raw[2])
    assert opt.mask().tolist() == [0.0, 1.0, 1.0]
    assert [torch.equal(p, b) for p, b in zip(params, before)] == [True, False, False]  # step 6 froze `low`


def test_per_example_snr_matches_explicit_loop():
    model = make_model()
    model.eval()
    x, y = batches(1, size=10)[0]
    loss_fn = torch.nn.functional.cross_entropy
    fast = per_example_gradient_snr(model, loss_fn, x, y)
    per_example = []
    for i in range(10):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        per_example.append([p.grad.clone() for p in model.parameters()])
    expected = [reference_tensor_snr([pe[k] for pe in per_example]) for k in range(len(per_example[0]))]
    torch.testing.assert_close(fast, torch.tensor(expected, dtype=fast.dtype), rtol=1e-8, atol=1e-12)


def test_calibrate_sets_the_mask_before_training():
    generator = torch.Generator().manual_seed(0)
    model = SignalNoise()
    opt = AutoSNR(torch.optim.SGD(model.parameters(), lr=0.1), threshold=0.5, samples=2)
    x = torch.randn(16, 30, generator=generator)
    assert opt.calibrate(model, lambda out, y: out.sum(), x, torch.zeros(16)).tolist() == [1.0, 0.0]
    # the first step already freezes, and no free sampling follows: gradients with the roles
    # swapped leave the mask as calibrated
    params = [model.signal, model.noise]
    assert run_steps(opt, params, ["noise", "signal"], generator, 4) == [[True, False]] * 4
    assert opt.mask().tolist() == [1.0, 0.0]


def test_calibrate_requires_eval_batchnorm_and_model_params():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = AutoSNR(torch.optim.SGD(model.parameters(), lr=0.1), threshold=0.5)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="model.eval"):
        opt.calibrate(model, torch.nn.functional.cross_entropy, x, y)
    model.eval()
    other = AutoSNR(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), threshold=0.5)
    with pytest.raises(ValueError, match="do not belong to the model"):
        other.calibrate(model, torch.nn.functional.cross_entropy, x, y)


def test_freeze_requires_grad_between_phases():
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(20)) for _ in range(3)]
    opt = AutoSNR(torch.optim.SGD(params, lr=0.1), threshold=0.5, samples=2)
    run_steps(opt, params, ["noise", "noise", "signal"], generator, 2)
    assert opt.freeze_requires_grad() == 2  # the mask estimated at the last step, not yet applied
    assert [p.requires_grad for p in params] == [False, False, True]
    assert [p.grad is None for p in params] == [True, True, False]


def test_composes_around_auto_rgn():
    model = make_model(dtype=torch.float32)
    inner = AutoRGN(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    opt = AutoSNR(inner, threshold=0.8, samples=2)
    data = batches(5, dtype=torch.float32)
    for x, y in data[:2]:
        opt.zero_grad()
        backward(model, x, y)
        opt.step()
    frozen = [i for i, m in enumerate(opt.mask()) if m == 0]
    assert frozen
    opt.zero_grad()
    backward(model, *data[2])
    opt.step()
    m = inner.multipliers()
    assert all(m[i] == 0 for i in frozen)  # frozen tensors reach AutoRGN without gradient
    assert m.max() == 1
    sd = opt.state_dict()
    assert "surgical_optim.AutoRGN" in sd and "surgical_optim.AutoSNR" in sd


def test_block_summary_reports_trained_share_per_group():
    generator = torch.Generator().manual_seed(0)
    signal, noise, other = (torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (10, 30, 5))
    params, kinds = [signal, noise, other], ["signal", "noise", "noise"]
    groups = [{"params": [signal, noise], "name": "first"}, {"params": [other], "name": "rest"}]
    opt = AutoSNR(torch.optim.SGD(groups, lr=0.1), threshold=0.5, samples=3)
    history = []
    for _ in range(3):
        signal_and_noise_grads(params, kinds, generator)
        history.append([p.grad.clone() for p in params])
        opt.step()
    raw = [reference_tensor_snr([h[i] for h in history]) for i in range(3)]
    normalised = [r / max(raw) for r in raw]
    rows = opt.block_summary()
    assert [(r["name"], r["tensors"], r["trained_tensors"]) for r in rows] == [("first", 2, 1), ("rest", 1, 0)]
    assert [r["trained_fraction"] for r in rows] == [0.25, 0.0]  # 10 of 40 elements; none of 5
    assert rows[0]["mean_score"] == pytest.approx((normalised[0] + normalised[1]) / 2, rel=1e-9)
    assert rows[0]["max_score"] == pytest.approx(max(normalised[:2]), rel=1e-9)
    assert rows[1]["mean_score"] == pytest.approx(normalised[2], rel=1e-9)
    assert [(r["params"], r["trained_tensors"]) for r in rows] == [(40, 1), (5, 0)]


# ---------------------------------------------------------------------- sparse gradients
# A sparse gradient is the dense gradient with zeros in the untouched rows: the statistics must be
# exactly those of that dense gradient.


def embedding_model(sparse: bool) -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Embedding(12, 5, sparse=sparse), torch.nn.Flatten(), torch.nn.Linear(15, 3)
    ).double()


def token_batches(n: int, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    # 8 examples of 3 tokens from 12: repeated rows (uncoalesced gradients) and untouched rows
    return [(torch.randint(0, 12, (8, 3), generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("estimator, threshold", [("samples", 0.9), ("official_eb", 0.95)])
def test_sparse_embedding_statistics_equal_the_dense_ones(estimator, threshold):
    runs = {}
    for sparse in (False, True):
        model = embedding_model(sparse)
        opt = AutoSNR(torch.optim.SGD(model.parameters(), lr=0.1), threshold=threshold, samples=4, estimator=estimator)
        for x, y in token_batches(6):
            opt.zero_grad()
            backward(model, x, y)
            opt.step()
        runs[sparse] = (opt.raw_snr(), opt.mask(), [p.detach().clone() for p in model.parameters()])
    (dense_raw, dense_mask, dense_weights), (sparse_raw, sparse_mask, sparse_weights) = runs[False], runs[True]
    assert model[0].weight.grad.is_sparse  # the sparse run really had sparse gradients
    torch.testing.assert_close(sparse_raw, dense_raw, rtol=1e-12, atol=0)
    assert torch.equal(sparse_mask, dense_mask)
    assert 0 < sparse_mask.sum() < len(sparse_mask)  # the weights below were compared under freezing
    for a, b in zip(sparse_weights, dense_weights):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_sparse_embedding_matches_reference():
    fast_model, ref_model = embedding_model(True), embedding_model(True)
    fast = AutoSNR(torch.optim.SGD(fast_model.parameters(), lr=0.5), threshold=0.3, samples=3)
    ref = ReferenceAutoSNR(torch.optim.SGD(ref_model.parameters(), lr=0.5), threshold=0.3, samples=3)
    for x, y in token_batches(6):
        step_both_and_compare(fast, fast_model, ref, ref_model, x, y)
    torch.testing.assert_close(fast.snr(), torch.tensor(ref.normalised, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert fast.mask().tolist() == [float(k) for k in ref.keep]


def two_tables():
    """Two sparse embedding tables: one whose gradient is the same every step (high SNR), one whose
    gradient is pure noise (low SNR)."""
    torch.manual_seed(5)
    return torch.nn.Embedding(10, 4, sparse=True), torch.nn.Embedding(10, 4, sparse=True)


def two_tables_backward(signal, noise, generator):
    tokens = torch.tensor([0, 2, 2, 7])  # row 2 twice: an uncoalesced gradient
    weights = torch.randn(4, 4, generator=generator)
    (signal(tokens).sum() + (noise(tokens) * weights).sum()).backward()


@pytest.mark.parametrize("inner", ["sgd", "adagrad", "sparse_adam"])
def test_sparse_gradients_train_and_freeze(inner):
    signal, noise = two_tables()
    params = [signal.weight, noise.weight]
    make = {
        "sgd": lambda: torch.optim.SGD(params, lr=0.1),
        "adagrad": lambda: torch.optim.Adagrad(params, lr=0.1),
        "sparse_adam": lambda: torch.optim.SparseAdam(params, lr=0.1),
    }[inner]
    opt = AutoSNR(make(), threshold=0.5, samples=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        two_tables_backward(signal, noise, generator)
        opt.step()
    assert opt.mask().tolist() == [1.0, 0.0]
    signal_before, noise_before = signal.weight.detach().clone(), noise.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        two_tables_backward(signal, noise, generator)
        opt.step()
    assert torch.equal(noise.weight, noise_before)  # frozen: bit-identical
    touched = [0, 2, 7]
    assert (signal.weight[touched] != signal_before[touched]).all()  # trained: every touched row moves


def test_calibrate_with_a_sparse_embedding_equals_the_dense_one():
    x, y = token_batches(1)[0]
    masks = {}
    for sparse in (False, True):
        model = embedding_model(sparse).eval()
        opt = AutoSNR(torch.optim.SGD(model.parameters(), lr=0.1), threshold=0.3)
        masks[sparse] = (opt.calibrate(model, torch.nn.functional.cross_entropy, x, y), opt.raw_snr())
        assert model[0].sparse == sparse  # the module is left as it was
    assert torch.equal(masks[True][0], masks[False][0])
    torch.testing.assert_close(masks[True][1], masks[False][1], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------- layout resets
# Loading a plain inner state dict or adding a param group resets the statistics; estimation must
# then start over, or (with refresh_every=None) nothing would ever be frozen again.


@pytest.mark.parametrize("trigger", ["plain_state_dict", "add_param_group"])
def test_layout_reset_restarts_estimation(trigger):
    generator = torch.Generator().manual_seed(0)
    signal, noise = torch.nn.Parameter(torch.zeros(30)), torch.nn.Parameter(torch.zeros(30))
    params, kinds = [signal, noise], ["signal", "noise"]
    opt = AutoSNR(torch.optim.SGD(params, lr=0.1), threshold=0.5, samples=3)
    run_steps(opt, params, kinds, generator, 3)
    assert opt.mask().tolist() == [1.0, 0.0]
    if trigger == "plain_state_dict":
        opt.load_state_dict(opt.optimizer.state_dict())  # no AutoSNR key: the mask is gone
    else:
        extra = torch.nn.Parameter(torch.zeros(30))
        opt.add_param_group({"params": [extra]})
        params, kinds = params + [extra], kinds + ["noise"]
    assert not opt.calibrated
    # a new estimate from the next `samples` steps, which train everything ...
    assert run_steps(opt, params, kinds, generator, 3) == [[True] * len(params)] * 3
    assert opt.calibrated
    assert opt.mask().tolist() == [1.0] + [0.0] * (len(params) - 1)
    # ... and freezes the noise tensors from then on
    assert run_steps(opt, params, kinds, generator, 2) == [[True] + [False] * (len(params) - 1)] * 2


def test_layout_reset_after_calibrate_samples_again():
    """The calibration covered the old layout only: after a reset the free sampling takes over."""
    generator = torch.Generator().manual_seed(0)
    model = SignalNoise()
    opt = AutoSNR(torch.optim.SGD(model.parameters(), lr=0.1), threshold=0.5, samples=3)
    x = torch.randn(16, 30, generator=generator)
    mask = opt.calibrate(model, lambda out, y: out.sum(), x, torch.zeros(16))
    assert mask.tolist() == [1.0, 0.0]
    extra = torch.nn.Parameter(torch.zeros(30))
    opt.add_param_group({"params": [extra]})
    params, kinds = [model.signal, model.noise, extra], ["signal", "noise", "noise"]
    assert run_steps(opt, params, kinds, generator, 3) == [[True] * 3] * 3
    assert opt.mask().tolist() == [1.0, 0.0, 0.0]
    assert run_steps(opt, params, kinds, generator, 1) == [[True, False, False]]


# ---------------------------------------------------------------------- a threshold that freezes nearly everything
def nearly_all_frozen_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning) and "AutoSNR" in str(w.message)]


def test_warns_once_when_one_tensor_sets_the_maximum_and_the_rest_is_frozen():
    # one tensor with a steady gradient (a LayerNorm weight, say) and 20 noisy ones: normalised by
    # the steady tensor's SNR, every other falls below 0.5
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))]
    params += [torch.nn.Parameter(torch.zeros(50, dtype=torch.float64)) for _ in range(20)]
    kinds = ["signal"] + ["noise"] * 20
    opt = AutoSNR(torch.optim.SGD(params, lr=0.1), threshold=0.5, samples=3, refresh_every=4)
    with pytest.warns(UserWarning) as record:
        moved = run_steps(opt, params, kinds, generator, 12)  # estimates after steps 3, 7 and 11
    assert moved[3] == [True] + [False] * 20  # the mask was applied
    (warning,) = nearly_all_frozen_warnings(record)  # once, not once per estimate
    message = str(warning.message)
    assert "AutoSNR(threshold=0.5) froze 99.60% of the parameters (20 of 21 tensors)" in message
    assert "frozen_fraction()" in message and "block_summary()" in message and "lower threshold" in message
    assert opt.frozen_fraction() == pytest.approx(1000 / 1004)


def test_no_warning_for_two_tensors_however_few_elements_they_hold(recwarn):
    # two tensors holding 0.1% of the elements: as small a share as a last layer (the paper's
    # WRN-28-10's is 0.018%), a surgical choice rather than a misfire
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(20, dtype=torch.float64)) for _ in range(2)]
    params += [torch.nn.Parameter(torch.zeros(20_000, dtype=torch.float64)) for _ in range(2)]
    opt = AutoSNR(torch.optim.SGD(params, lr=0.1), threshold=0.5, samples=5)
    moved = run_steps(opt, params, ["signal", "signal", "noise", "noise"], generator, 6)
    assert moved[5] == [True, True, False, False]
    assert opt.frozen_fraction() == pytest.approx(40_000 / 40_040)
    assert not nearly_all_frozen_warnings(recwarn.list)


def test_warns_after_calibrate_too():
    model = SignalNoise()
    opt = AutoSNR(torch.optim.SGD(model.parameters(), lr=0.1), threshold=0.5)
    x = torch.randn(16, 30, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning) as record:
        opt.calibrate(model, lambda out, target: out.sum(), x, torch.zeros(16))
    assert opt.mask().tolist() == [1.0, 0.0]
    assert len(nearly_all_frozen_warnings(record)) == 1


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_no_warning_while_a_fair_share_trains(threshold, recwarn):
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (200, 200, 30, 5)]
    opt = AutoSNR(torch.optim.SGD(params, lr=0.1), threshold=threshold, samples=5)
    moved = run_steps(opt, params, ["signal", "signal", "noise", "noise"], generator, 7)
    assert moved[6][:2] == [True, True]  # both steady tensors train: 400 of 435 elements
    assert not nearly_all_frozen_warnings(recwarn.list)


def test_the_readme_recipe_for_a_threshold_calibrate_read_lower_calibrate_again():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 1))
    opt = AutoSNR(torch.optim.SGD(model.parameters(), lr=0.1), threshold=1.0)
    x = torch.randn(16, 30, generator=torch.Generator().manual_seed(0))
    loss = lambda out, target: ((out.squeeze(-1) - target) ** 2).mean()
    with pytest.warns(UserWarning, match="lower threshold"):
        opt.calibrate(model, loss, x, torch.zeros(16))
    (row,) = opt.block_summary()
    assert row["trained_tensors"] == 1 and row["max_score"] == 1.0
    opt.threshold = float(opt.snr().min())  # no tensor strictly below it: both train
    opt.calibrate(model, loss, x, torch.zeros(16))
    assert opt.mask().tolist() == [1.0, 1.0] and opt.frozen_fraction() == 0.0
