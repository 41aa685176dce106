"""The library's public surface: what is exported, the reports' schemas and how they print, the
multipliers before the first step, and the deprecated spelling of AutoRGN's update choice."""

from __future__ import annotations

import warnings

import pytest
import torch

import surgical_optim
from surgical_optim import AutoRGN, AutoSNR, BlockSummary


def test_exports_are_the_documented_api():
    assert set(surgical_optim.__all__) == {
        "AutoRGN", "AutoSNR", "BlockMatcher", "BlockRow", "BlockSelector", "BlockSummary",
        "NormEvalHandle", "TrainableReport", "UnknownBlockError", "adapt_online", "block_names", "keep_norm_eval",
        "param_groups_by_block", "per_example_gradient_snr", "select_blocks", "trainable_report",
        "__version__",
    }
    # the base class's hooks are private: it is not an extension point, so it is not exported
    assert not hasattr(surgical_optim, "OptimizerWrapper")
    from surgical_optim import auto_rgn

    assert auto_rgn.__all__ == ["AutoRGN"]
    assert not {"rgn_multipliers", "normalise", "plan_index"} & set(vars(auto_rgn))


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(n)) for n in (3, 4, 5)]


def _one_step(opt, params):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


def test_both_block_summaries_share_one_schema_and_print_as_a_table():
    params = _params()
    groups = [{"params": params[:2], "name": "stem"}, {"params": params[2:], "name": "head"}]
    rgn = AutoRGN(torch.optim.SGD(groups, lr=0.1))
    snr_params = _params()
    snr = AutoSNR(torch.optim.SGD([{"params": snr_params[:2], "name": "stem"}, {"params": snr_params[2:], "name": "head"}], lr=0.1), samples=2)
    for _ in range(2):
        _one_step(rgn, params)
        _one_step(snr, snr_params)
    keys = {"name", "tensors", "params", "trained_tensors", "trained_fraction", "mean_score", "max_score"}
    for opt, score in ((rgn, "multiplier"), (snr, "snr")):
        summary = opt.block_summary()
        assert isinstance(summary, BlockSummary) and summary.score == score
        assert [set(row) for row in summary] == [keys, keys]
        assert [(row["name"], row["tensors"], row["params"]) for row in summary] == [("stem", 2, 7), ("head", 1, 5)]
        lines = str(summary).splitlines()
        assert lines[0].split() == ["block", "tensors", "params", "trained", "mean", score, "max", score]
        assert lines[1].split()[:3] == ["stem", f"{summary[0]['trained_tensors']}/2", "7"]
    m = rgn.multipliers()
    row = rgn.block_summary()[0]
    assert row["mean_score"] == pytest.approx(float(m[:2].mean())) and row["max_score"] == pytest.approx(float(m[:2].max()))


def test_block_multipliers_print_their_values_and_stay_device_tensors():
    params = _params()
    opt = AutoRGN(torch.optim.SGD([{"params": params[:2], "name": "stem"}, {"params": params[2:], "name": "head"}], lr=0.1))
    _one_step(opt, params)
    blocks = opt.block_multipliers()
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in blocks.values())
    m = opt.multipliers()
    assert str(blocks) == f"stem: {float(m[:2].mean()):.4f}, head: {float(m[2:].mean()):.4f}"


def test_unnamed_groups_are_called_group_i_and_the_table_says_how_to_name_them():
    params = _params()
    opt = AutoRGN(torch.optim.SGD(params, lr=0.1))  # as from model.parameters()
    assert [row["name"] for row in opt.block_summary()] == ["group0"]
    assert "param_groups_by_block(model)" in str(opt.block_summary())
    named = AutoRGN(torch.optim.SGD([{"params": params, "name": "all"}], lr=0.1))
    assert "param_groups_by_block" not in str(named.block_summary())


def test_multipliers_before_the_first_step_are_one():
    params = _params()
    opt = AutoRGN(torch.optim.SGD(params, lr=0.1))
    assert opt.multipliers().tolist() == [1.0, 1.0, 1.0]
    assert [row["trained_tensors"] for row in opt.block_summary()] == [3]
    # the first step's own gradients decide that step: the initial value is never used
    params[0].grad, params[1].grad, params[2].grad = (torch.zeros(3), params[1].detach() * 0.1, torch.zeros(5))
    before = [p.detach().clone() for p in params]
    opt.step()
    assert opt.multipliers().tolist() == [0.0, 1.0, 0.0]
    assert torch.equal(params[0], before[0]) and not torch.equal(params[1], before[1])


@pytest.mark.parametrize(
    "old, new", [("fold", "per_tensor_lr"), ("snapshot", "scaled_step"), ("auto", "auto")]
)
def test_rescale_is_deprecated_for_update(old, new):
    with pytest.warns(DeprecationWarning, match=f"update='{new}'"):
        opt = AutoRGN(torch.optim.SGD(_params(), lr=0.1), rescale=old)
    assert opt.update == new
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert AutoRGN(torch.optim.SGD(_params(), lr=0.1), update=new).update == new
    with pytest.raises(TypeError, match="not both"):
        AutoRGN(torch.optim.SGD(_params(), lr=0.1), update="scaled_step", rescale=old)
    with pytest.raises(ValueError, match="'auto', 'per_tensor_lr' or 'scaled_step'"):
        AutoRGN(torch.optim.SGD(_params(), lr=0.1), update="fold")
