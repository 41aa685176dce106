"""Integration tests with real clients: Lightning, Accelerate, torch.amp.GradScaler, transformers.

Each client is imported with ``pytest.importorskip`` so the suite passes where it is absent. Models are
tiny and runs are a few steps long, on the CPU.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgical_optim
from surgical_optim import AutoRGN, AutoSNR

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


# ---------------------------------------------------------------------------------------------- helpers
def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def make_data(rows: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, generator=g)
    # a learnable rule plus label noise, so gradients differ between tensors and batches
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    noise = torch.randint(0, 3, (rows,), generator=g)
    y = torch.where(torch.rand(rows, generator=g) < 0.2, noise, y)
    return x, y


def make_loader(rows: int = 12, batch_size: int = 4) -> torch.utils.data.DataLoader:
    x, y = make_data(rows)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False
    )


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs")


def adamw(params, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def rgn_factory(params):
    # refresh_every=2: the averaging window straddles the checkpoint taken after an odd step
    return AutoRGN(adamw(params), refresh_every=2)


def snr_factory(params):
    # the mask is estimated at the end of step 3 and applied from step 4
    return AutoSNR(adamw(params), threshold=0.5, samples=3)


# ---------------------------------------------------------------------------------------------- Lightning
def _lightning():
    return pytest.importorskip("lightning.pytorch")


def _lightning_module_class(L):
    class TinyModule(L.LightningModule):
        def __init__(self, factory, seed: int = 0) -> None:
            super().__init__()
            self.net = make_net(seed)
            self.factory = factory
            self.training_steps = 0
            self.wrapper_state_at_start = None

        def training_step(self, batch, batch_idx):
            self.training_steps += 1
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def on_train_start(self) -> None:
            # what the wrapper holds right after Lightning restored the checkpoint (if any)
            wrapper = self.trainer.optimizers[0]
            self.wrapper_state_at_start = copy.deepcopy(wrapper.state_dict()[wrapper._state_key])

        def configure_optimizers(self):
            optimizer = self.factory(self.parameters())
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return TinyModule


def _trainer(L, tmp_path, max_steps: int, checkpoint_every: int | None = None):
    callbacks = None
    if checkpoint_every is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=checkpoint_every, save_top_k=-1)]
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=callbacks is not None,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )


def _fit(L, tmp_path, factory, max_steps, *, seed=0, ckpt_path=None, checkpoint_every=None):
    module = _lightning_module_class(L)(factory, seed=seed)
    trainer = _trainer(L, tmp_path, max_steps, checkpoint_every)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=make_loader(), ckpt_path=ckpt_path)
    return module, trainer


def _checkpoint_at_step(directory, step: int) -> str:
    # Saved by ModelCheckpoint(every_n_train_steps) in on_train_batch_end. Not trainer.save_checkpoint()
    # after fit(max_steps=...) stopped: Lightning 2.6 restores such a checkpoint as an unfinished epoch
    # and restarts the (non-stateful) loader, so even a bare AdamW run would see different batches.
    found = sorted(directory.glob(f"*step={step}.ckpt"))
    assert len(found) == 1, found
    return str(found[0])


def test_lightning_autorgn_fit_with_scheduler(tmp_path):
    L = _lightning()
    initial = weights(make_net(0))
    module, trainer = _fit(L, tmp_path, rgn_factory, max_steps=5)
    wrapper = trainer.optimizers[0]
    assert isinstance(wrapper, AutoRGN)
    # the closure Lightning passes was evaluated exactly once per step
    assert module.training_steps == 5
    final = weights(module.net)
    for key in initial:
        assert not torch.equal(initial[key], final[key]), f"{key} did not move"
    # StepLR(step_size=2, gamma=0.5) drove the inner optimizer's lr: 5 scheduler steps -> 0.05 / 4
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer is wrapper
    assert wrapper.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)
    assert wrapper.param_groups[0]["lr"] == wrapper.optimizer.param_groups[0]["lr"]
    assert all(state["step"].item() == 5 for state in wrapper.optimizer.state.values())
    m = wrapper.multipliers()
    assert m.shape == (4,)
    assert torch.all((m >= 0) & (m <= 1))
    assert m.max().item() == 1.0
    assert m.min().item() < 1.0, "multipliers are trivial"


def test_lightning_autorgn_resume_matches_uninterrupted(tmp_path):
    L = _lightning()
    full, _ = _fit(L, tmp_path / "full", rgn_factory, max_steps=6)

    half, trainer = _fit(L, tmp_path / "half", rgn_factory, max_steps=3, checkpoint_every=3)
    saved = copy.deepcopy(trainer.optimizers[0].state_dict()["surgical_optim.AutoRGN"])
    assert saved["window_steps"].item() == 1  # mid-window: the restore matters for step 4
    ckpt = _checkpoint_at_step(tmp_path / "half", 3)

    # a different initialisation: everything must come from the checkpoint
    resumed, trainer2 = _fit(L, tmp_path / "resumed", rgn_factory, max_steps=6, seed=7, ckpt_path=str(ckpt))
    restored = resumed.wrapper_state_at_start
    for key in ("multipliers", "rgn_sum", "zero_weight_any", "window_steps", "initialised"):
        torch.testing.assert_close(restored[key], saved[key], rtol=0, atol=0, msg=key)
    assert resumed.training_steps == 3
    assert_same_weights(weights(full.net), weights(resumed.net))
    torch.testing.assert_close(
        trainer2.optimizers[0].multipliers(), full.trainer.optimizers[0].multipliers(), rtol=0, atol=0
    )
    assert trainer2.optimizers[0].param_groups[0]["lr"] == full.trainer.optimizers[0].param_groups[0]["lr"]


def test_lightning_autosnr_resume_matches_uninterrupted(tmp_path):
    L = _lightning()
    full, full_trainer = _fit(L, tmp_path / "full", snr_factory, max_steps=6)

    half, trainer = _fit(L, tmp_path / "half", snr_factory, max_steps=3, checkpoint_every=3)
    wrapper = trainer.optimizers[0]
    assert wrapper.calibrated
    mask = wrapper.mask()
    assert (mask == 0).any() and (mask == 1).any(), f"need frozen and trained tensors, got {mask}"
    at_checkpoint = [p.detach().clone() for p in wrapper.params()]
    ckpt = _checkpoint_at_step(tmp_path / "half", 3)

    resumed, trainer2 = _fit(L, tmp_path / "resumed", snr_factory, max_steps=6, seed=7, ckpt_path=str(ckpt))
    restored = resumed.wrapper_state_at_start
    assert restored["step_count"] == 3
    torch.testing.assert_close(restored["mask"], mask, rtol=0, atol=0)
    # the mask estimated at step 3 is still waiting to be applied at step 4
    assert restored["pending_mask"] == [bool(v) for v in mask]

    wrapper2 = trainer2.optimizers[0]
    torch.testing.assert_close(wrapper2.mask(), mask, rtol=0, atol=0)
    assert_same_weights(weights(full.net), weights(resumed.net))
    torch.testing.assert_close(full_trainer.optimizers[0].mask(), mask, rtol=0, atol=0)
    for p, before, keep in zip(wrapper2.params(), at_checkpoint, mask.tolist()):
        if keep:
            assert not torch.equal(p, before), "a trained tensor did not move"
        else:
            assert torch.equal(p, before), "a frozen tensor moved"
            # its optimizer state did not advance either
            assert wrapper2.optimizer.state[p]["step"].item() == 3


def test_lightning_optimizer_proxy_reads_wrapper():
    """``self.optimizers()`` in a LightningModule is a LightningOptimizer proxy around the wrapper."""
    _lightning()
    from lightning.pytorch.core.optimizer import LightningOptimizer

    net = make_net()
    wrapper = AutoRGN(adamw(net.parameters()))
    proxy = LightningOptimizer(wrapper)
    assert isinstance(proxy, AutoRGN)
    F.cross_entropy(net(make_data()[0]), make_data()[1]).backward()
    wrapper.step()
    torch.testing.assert_close(proxy.multipliers(), wrapper.multipliers())
    assert proxy.param_groups is wrapper.optimizer.param_groups
    proxy.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_lightning_optimizer_proxy_state_dict():
    """LightningOptimizer subclasses the wrapper's class with its own `optimizer` property (the
    wrapper itself); the wrapper must reach its inner optimizer through `_inner` instead."""
    _lightning()
    from lightning.pytorch.core.optimizer import LightningOptimizer

    net = make_net()
    wrapper = AutoRGN(adamw(net.parameters()))
    F.cross_entropy(net(make_data()[0]), make_data()[1]).backward()
    wrapper.step()
    proxy = LightningOptimizer(wrapper)
    state = proxy.state_dict()  # e.g. self.optimizers().state_dict() inside a LightningModule
    expected = wrapper.state_dict()
    assert state.keys() == expected.keys()
    torch.testing.assert_close(
        state["surgical_optim.AutoRGN"]["multipliers"], expected["surgical_optim.AutoRGN"]["multipliers"]
    )
    assert state["state"][0]["step"] == expected["state"][0]["step"] == 1


# ---------------------------------------------------------------------------------------------- Accelerate
@pytest.fixture
def accelerate_mod():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield accelerate
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _lr_lambda(step: int) -> float:
    return 1.0 / (1.0 + step)


def _accelerate_setup(accelerate, factory, seed, **kwargs):
    accelerator = accelerate.Accelerator(cpu=True, **kwargs)
    net = make_net(seed)
    wrapper = factory(net.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(wrapper, _lr_lambda)
    net, optimizer, loader, scheduler = accelerator.prepare(net, wrapper, make_loader(), scheduler)
    return accelerator, net, wrapper, optimizer, loader, scheduler


def _accelerate_epoch(accelerator, net, optimizer, loader, scheduler) -> None:
    for x, y in loader:
        with accelerator.accumulate(net):
            loss = F.cross_entropy(net(x), y)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()


@pytest.mark.parametrize("factory", [rgn_factory, snr_factory], ids=["AutoRGN", "AutoSNR"])
def test_accelerate_save_load_state_resume(accelerate_mod, tmp_path, factory):
    acc, net, wrapper, opt, loader, sched = _accelerate_setup(accelerate_mod, factory, seed=0)
    assert isinstance(opt, accelerate_mod.optimizer.AcceleratedOptimizer)
    assert opt.optimizer is wrapper
    initial = weights(net)
    for _ in range(2):
        _accelerate_epoch(acc, net, opt, loader, sched)  # 3 steps per epoch
    full = weights(net)
    full_key_state = wrapper.state_dict()[wrapper._state_key]
    assert any(not torch.equal(initial[k], full[k]) for k in initial)
    assert wrapper.param_groups[0]["lr"] == pytest.approx(0.05 * _lr_lambda(6))

    acc, net, wrapper, opt, loader, sched = _accelerate_setup(accelerate_mod, factory, seed=0)
    _accelerate_epoch(acc, net, opt, loader, sched)
    saved = copy.deepcopy(wrapper.state_dict()[wrapper._state_key])
    acc.save_state(str(tmp_path / "state"))

    # a fresh, differently initialised copy
    acc, net2, wrapper2, opt2, loader2, sched2 = _accelerate_setup(accelerate_mod, factory, seed=7)
    acc.load_state(str(tmp_path / "state"))
    restored = wrapper2.state_dict()[wrapper2._state_key]
    assert restored.keys() == saved.keys()
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(restored[key], value, rtol=0, atol=0, msg=key)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            for a, b in zip(restored[key], value):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
        else:
            assert restored[key] == value, key
    if isinstance(wrapper2, AutoRGN):
        torch.testing.assert_close(wrapper2.multipliers(), saved["multipliers"], rtol=0, atol=0)
        assert saved["window_steps"].item() == 1
    else:
        torch.testing.assert_close(wrapper2.mask(), saved["mask"], rtol=0, atol=0)
        assert wrapper2.calibrated and saved["pending_mask"] is not None
        assert (saved["mask"] == 0).any()
    assert wrapper2.param_groups[0]["lr"] == wrapper.param_groups[0]["lr"]

    _accelerate_epoch(acc, net2, opt2, loader2, sched2)
    assert_same_weights(full, weights(net2))
    final_state = wrapper2.state_dict()[wrapper2._state_key]
    key = "multipliers" if isinstance(wrapper2, AutoRGN) else "mask"
    torch.testing.assert_close(final_state[key], full_key_state[key], rtol=0, atol=0)


def test_accelerate_gradient_accumulation_steps_wrapper_on_sync_only(accelerate_mod):
    acc, net, wrapper, opt, loader, sched = _accelerate_setup(
        accelerate_mod, lambda params: AutoRGN(adamw(params)), seed=0, gradient_accumulation_steps=2
    )
    calls = []
    wrapper.register_step_post_hook(lambda optimizer, args, kwargs: calls.append(1))
    x, y = make_data(16)
    micro_batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]
    syncs = []
    for i, (xb, yb) in enumerate(micro_batches):
        with acc.accumulate(net):
            acc.backward(F.cross_entropy(net(xb), yb))
            syncs.append(acc.sync_gradients)
            opt.step()
            sched.step()
            opt.zero_grad()
        assert len(calls) == sum(syncs), f"micro-batch {i}"
        if not syncs[-1]:
            assert all(p.grad is not None for p in net.parameters()), "gradients were zeroed mid-accumulation"
    assert syncs == [False, True, False, True]
    assert len(calls) == 2
    assert all(state["step"].item() == 2 for state in wrapper.optimizer.state.values())
    assert wrapper.param_groups[0]["lr"] == pytest.approx(0.05 * _lr_lambda(2))

    # the same two steps done by hand: mean of the two half-losses' gradients
    ref_net = make_net(0)
    ref = AutoRGN(adamw(ref_net.parameters()))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, _lr_lambda)
    for (xa, ya), (xb, yb) in zip(micro_batches[::2], micro_batches[1::2]):
        (F.cross_entropy(ref_net(xa), ya) / 2).backward()
        (F.cross_entropy(ref_net(xb), yb) / 2).backward()
        ref.step()
        ref_sched.step()
        ref.zero_grad()
    for (name, a), b in zip(net.named_parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(wrapper.multipliers(), ref.multipliers(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- GradScaler
def _cpu_scaler(**kwargs):
    try:
        scaler = torch.amp.GradScaler("cpu", **kwargs)
    except Exception as error:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.amp.GradScaler('cpu') is not usable here: {error!r}")
    if not scaler.is_enabled():  # pragma: no cover
        pytest.skip("torch.amp.GradScaler('cpu') is disabled in this build")
    return scaler


def _autocast_dtype() -> torch.dtype:
    for dtype in (torch.float16, torch.bfloat16):
        try:
            with torch.autocast("cpu", dtype=dtype):
                out = nn.Linear(2, 2)(torch.randn(1, 2))
            if out.dtype == dtype:
                return dtype
        except Exception:  # pragma: no cover
            continue
    pytest.skip("CPU autocast supports neither float16 nor bfloat16 here")  # pragma: no cover


def _scaled_step(model, optimizer, scaler, x, y, *, autocast_dtype=None, poison=False, clip=True) -> None:
    if autocast_dtype is not None:
        with torch.autocast("cpu", dtype=autocast_dtype):
            loss = F.cross_entropy(model(x).float(), y)
    else:
        loss = F.cross_entropy(model(x), y)
    if poison:
        loss = loss * float("inf")
    scaler.scale(loss).backward()
    if clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    # without unscale_, scaler.step unscales (or, for a fused optimizer, lets step() unscale)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()


def _fused_options():
    options = [False]
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(1))], fused=True)
        options.append(True)
    except Exception:  # pragma: no cover - CPU fused AdamW missing in this build
        pass
    return options


@pytest.mark.parametrize("update", ["scaled_step", "auto"])
@pytest.mark.parametrize("clip", [True, False], ids=["unscale_+clip", "step_unscales"])
@pytest.mark.parametrize("fused", _fused_options(), ids=lambda f: f"fused={f}")
def test_grad_scaler_single_tensor_matches_bare_adamw(fused, clip, update):
    """One parameter tensor: its multiplier is exactly 1, so the wrapped run is the bare run, bit for
    bit (the folded update on CPU is torch's own arithmetic at multiplier 1)."""
    dtype = _autocast_dtype()
    x, y = make_data(16)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]

    def build():
        torch.manual_seed(3)
        model = nn.Linear(4, 3, bias=False)
        return model, torch.optim.AdamW(model.parameters(), lr=0.05, fused=fused)

    bare_model, bare_opt = build()
    model, inner = build()
    wrapper = AutoRGN(inner, update=update)
    folds = update == "auto" and not fused  # fused inner optimizers always take the snapshot path
    assert not getattr(wrapper, "_step_supports_amp_scaling", False)
    bare_scaler, scaler = _cpu_scaler(init_scale=2.0**12), _cpu_scaler(init_scale=2.0**12)
    for step, (xb, yb) in enumerate(batches):
        _scaled_step(bare_model, bare_opt, bare_scaler, xb, yb, autocast_dtype=dtype, clip=clip)
        _scaled_step(model, wrapper, scaler, xb, yb, autocast_dtype=dtype, clip=clip)
        assert wrapper.multipliers().tolist() == [1.0]
        assert wrapper.last_step_folded == (folds and step > 0)  # the first step creates the state
        torch.testing.assert_close(model.weight, bare_model.weight, rtol=0, atol=0, msg=f"step {step}")
        assert scaler.get_scale() == bare_scaler.get_scale()

    # a step whose gradients are inf is skipped: no parameter or state moves, the scale backs off
    before = model.weight.detach().clone()
    state_before = copy.deepcopy(inner.state_dict())
    multipliers_before = wrapper.multipliers()
    scale_before = scaler.get_scale()
    _scaled_step(model, wrapper, scaler, *batches[0], autocast_dtype=dtype, poison=True, clip=clip)
    assert torch.equal(model.weight, before)
    assert inner.state_dict()["state"][0]["step"] == state_before["state"][0]["step"]
    assert torch.equal(inner.state_dict()["state"][0]["exp_avg"], state_before["state"][0]["exp_avg"])
    assert torch.equal(wrapper.multipliers(), multipliers_before)
    assert scaler.get_scale() == scale_before * 0.5


@pytest.mark.parametrize("clip", [True, False], ids=["unscale_+clip", "step_unscales"])
@pytest.mark.parametrize("wrap", ["AutoRGN", "AutoSNR"])
def test_grad_scaler_unscales_exactly_once(wrap, clip):
    """float32, power-of-two scale: scaling and unscaling are exact, so a scaled run must equal the
    unscaled run bit for bit. SGD is not scale-invariant: unscaling twice or never would show."""
    x, y = make_data(16)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)] * 2

    def build():
        model = make_net(5)
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if wrap == "AutoRGN":
            return model, AutoRGN(inner)
        return model, AutoSNR(inner, threshold=0.5, samples=3)

    plain_model, plain = build()
    model, wrapper = build()
    scaler = _cpu_scaler(init_scale=2.0**10, growth_interval=3)
    for step, (xb, yb) in enumerate(batches):
        F.cross_entropy(plain_model(xb), yb).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(plain_model.parameters(), max_norm=1.0)
        plain.step()
        plain.zero_grad()
        _scaled_step(model, wrapper, scaler, xb, yb, clip=clip)
        for a, b in zip(model.parameters(), plain_model.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"step {step}")
    assert scaler.get_scale() > 2.0**10  # the scale grew, so several scales were exercised
    if wrap == "AutoRGN":
        torch.testing.assert_close(wrapper.multipliers(), plain.multipliers(), rtol=0, atol=0)
        assert wrapper.multipliers().min() < 1
    else:
        torch.testing.assert_close(wrapper.mask(), plain.mask(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- transformers
def test_transformers_tiny_bert_block_multipliers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config)
    model.train()
    groups = surgical_optim.param_groups_by_block(model)
    wrapper = AutoRGN(torch.optim.AdamW(groups, lr=1e-3))
    scheduler = transformers.get_linear_schedule_with_warmup(wrapper, num_warmup_steps=1, num_training_steps=4)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 100, (4, 8), generator=g)
    labels = torch.randint(0, 3, (4,), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
            out.loss.backward()
            wrapper.step()
            scheduler.step()
            wrapper.zero_grad()
            assert math.isfinite(out.loss.item())
    # the scheduler saw the wrapper's step (torch warns when scheduler.step() seems to come first)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]

    # linear warm-up/decay over 4 steps, 3 taken: lr = 1e-3 * (4 - 3) / (4 - 1)
    assert wrapper.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 3)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, initial[n])]
    assert "classifier.weight" in moved and any("encoder.layer.0" in n for n in moved)

    # the encoder's split, as the README describes it: embeddings, one block per layer, pooler, head
    names = ["embeddings", "layer0", "layer1", "pooler", "classifier"]
    blocks = wrapper.block_multipliers()
    assert list(blocks) == names
    values = torch.stack([torch.as_tensor(v) for v in blocks.values()])
    assert torch.all((values >= 0) & (values <= 1))
    m = wrapper.multipliers()
    assert m.numel() == sum(1 for _ in model.parameters())
    assert m.max().item() == 1.0
    assert torch.all((m >= 0) & (m <= 1))
    # each block's mean multiplier is the mean over its own tensors, in param_groups order
    start = 0
    for group, value in zip(wrapper.param_groups, values):
        count = len(group["params"])
        torch.testing.assert_close(value, m[start : start + count].mean())
        start += count
    summary = wrapper.block_summary()
    assert [row["name"] for row in summary] == names
    assert sum(row["tensors"] for row in summary) == m.numel()
