"""auto_select (benchmarks/protocol/select.py): the candidate with the best validation score, run or at hand."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.protocol import (
    FinetuneResult,
    PrefixCache,
    ProtocolConfig,
    default_candidates,
    finetune,
    select_from_results,
    select_method,
)

try:  # the tiny ResNet-like model and data of the protocol tests
    from test_protocol import _data, _model
except ImportError:  # tests/ imported as a package
    from tests.test_protocol import _data, _model

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ProtocolConfig(lrs=(1e-1, 1e-2), epochs=3, batch_size=8)
DATA = (_data(48, 1), _data(24, 2), _data(30, 3))


def _result(val_acc: float, val_loss: float, test_acc: float = 0.5) -> FinetuneResult:
    return FinetuneResult(method="m", seed=0, lr=0.1, epoch=1, val_acc=val_acc, val_loss=val_loss,
                          test_acc=test_acc, test_loss=1.0)


def test_select_from_results_ranks_by_validation_accuracy_then_loss():
    results = {"a": _result(0.5, 0.2, test_acc=0.9), "b": _result(0.7, 0.9), "c": _result(0.7, 0.4),
               "d": _result(0.7, 0.4, test_acc=0.99)}
    name, best = select_from_results(results)
    assert name == "c" and best is results["c"]  # tie on accuracy: lower loss; tie on both: the earlier
    # the same over dicts (FinetuneResult.to_dict()), and a result without a validation accuracy never wins
    as_dicts = {k: v.to_dict() for k, v in results.items()} | {"e": {"val_acc": math.nan, "val_loss": 0.0}}
    assert select_from_results(as_dicts)[0] == "c"
    assert select_from_results({"x": {"val_acc": 0.3, "val_loss": math.nan}, "y": {"val_acc": 0.3,
                                                                                   "val_loss": 5.0}})[0] == "y"
    with pytest.raises(ValueError):
        select_from_results({"e": {"val_acc": math.nan, "val_loss": 0.0}})


@pytest.fixture(scope="module")
def each_candidate() -> dict[str, FinetuneResult]:
    """Every default candidate run on its own (sharing activations, as select_method does)."""
    model, cache, threads = _model(), PrefixCache(), torch.get_num_threads()
    torch.set_num_threads(1)  # the one_thread fixture, for a module-wide fixture
    try:
        return {name: finetune(model, name, *DATA, config=CFG, seed=5, prefix_cache=cache, data_key="d",
                               return_state=True) for name in default_candidates(model, CFG)}
    finally:
        torch.set_num_threads(threads)


def test_select_method_equals_the_choice_over_candidates_run_one_by_one(each_candidate):
    assert list(each_candidate) == ["block:stem", "block:layer1", "block:layer2", "block:layer3", "block:layer4",
                                    "block:fc", "all"]
    assert len({r.val_acc for r in each_candidate.values()}) > 2  # the candidates differ: a real choice
    want = max(each_candidate, key=lambda n: (each_candidate[n].val_acc, -each_candidate[n].val_loss))
    assert select_from_results(each_candidate)[0] == want
    got = select_method(_model(), None, *DATA, config=CFG, seed=5, return_state=True)
    assert got.method == "auto_select" and got.chosen == want
    chosen = each_candidate[want]
    assert (got.lr, got.epoch, got.val_acc, got.test_acc) == (chosen.lr, chosen.epoch, chosen.val_acc,
                                                               chosen.test_acc)
    assert got.worst_group_acc == chosen.worst_group_acc and got.val_curves == chosen.val_curves
    for k, v in chosen.state.items():
        assert torch.equal(got.state[k], v), k
    assert got.candidates == {n: {"lr": r.lr, "epoch": r.epoch, "val_acc": r.val_acc, "val_loss": r.val_loss}
                              for n, r in each_candidate.items()}


def test_finetune_auto_select_is_select_method_with_the_configured_candidates(each_candidate):
    cfg = ProtocolConfig(lrs=CFG.lrs, epochs=CFG.epochs, batch_size=CFG.batch_size,
                         method_options={"auto_select": {"candidates": ["layer4", "fc", "block:layer4"]}})
    got = finetune(_model(), "auto_select", *DATA, config=cfg, seed=5)
    pair = {n: each_candidate[n] for n in ("block:layer4", "block:fc")}
    assert list(got.candidates) == list(pair)  # names canonical, duplicates dropped
    name, best = select_from_results(pair)
    assert pair["block:layer4"].test_acc != pair["block:fc"].test_acc  # the choice shows in the test accuracy
    assert got.method == "auto_select" and got.chosen == name and got.test_acc == best.test_acc
    default = finetune(_model(), "auto_select", *DATA, config=CFG, seed=5)
    assert default.chosen == select_from_results(each_candidate)[0]
    with pytest.raises(ValueError):
        select_method(_model(), ["auto_select"], *DATA, config=CFG)
    with pytest.raises(TypeError, match="candidates"):
        finetune(_model(), "auto_select", *DATA, config=ProtocolConfig(method_options={"auto_select": {"cands": []}}))
