"""keep_norm_eval: normalisation layers keep their running statistics through model.train()."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from surgical_optim import NormEvalHandle, keep_norm_eval


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.LayerNorm(4 * 4 * 4),
        nn.Linear(4 * 4 * 4, 2),
        nn.BatchNorm1d(2),
    )


def forward(model: nn.Module) -> torch.Tensor:
    return model(torch.randn(8, 3, 6, 6))


def running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(b, before[n]) for n, b in model.named_buffers())


def test_norm_layers_stay_in_eval_through_train_while_dropout_follows():
    model = make_model()
    handle = keep_norm_eval(model)
    assert handle.layers == (model[1], model[3], model[8])  # the layers with running statistics
    model.train()
    assert [m.training for m in model] == [True, False, True, False, True, True, True, True, False]
    before = running_stats(model)
    outputs = [forward(model) for _ in range(2)]
    assert unchanged(model, before)  # running statistics were used, not updated
    torch.manual_seed(1)
    x = torch.randn(8, 3, 6, 6)
    assert not torch.equal(model(x), model(x))  # dropout is still on in train mode
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert not model[1].training and model[4].training
    assert outputs[0].shape == (8, 2)


def test_remove_hands_the_layers_back_to_train_and_eval():
    model = make_model()
    handle = keep_norm_eval(model)
    model.train()
    handle.remove()
    assert model[1].training and model[8].training  # follow the model's current mode at once
    before = running_stats(model)
    forward(model)
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])  # updating again
    model.eval()
    assert not model[1].training
    handle.remove()  # twice is harmless


def test_context_manager_and_pinning_twice():
    model = make_model()
    with keep_norm_eval(model) as handle:
        assert keep_norm_eval(model).layers == ()  # already kept: a second handle takes none
        model.train()
        assert not model[1].training
        assert "3 normalisation layers" in repr(handle)
    model.train()
    assert model[1].training


def test_deepcopy_and_whole_model_pickle_keep_their_own_layers_in_eval():
    model = make_model()
    keep_norm_eval(model)
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copied in (twin, loaded):
        copied.train()
        assert not copied[1].training and copied[4].training
        before = running_stats(copied)
        forward(copied)
        assert unchanged(copied, before)
    assert set(model.state_dict()) == set(twin.state_dict())  # nothing added to the state dict


def test_torchvision_resnet_every_batchnorm_kept():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None)
    handle = keep_norm_eval(model)
    # bn1 + two per basic block (8 blocks) + one per downsampling shortcut (layers 2-4)
    assert len(handle.layers) == 1 + 2 * 8 + 3
    model.train()
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="keep_norm_eval\\(model\\)"):
        keep_norm_eval(make_model().parameters())
    assert isinstance(keep_norm_eval(nn.Linear(2, 2)), NormEvalHandle)
