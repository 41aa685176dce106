"""The run layer both benchmark suites share (benchmarks/runs/)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from benchmarks.runs import Cell, atomic_torch_save, atomic_write_text, config_hash, mean_se, read_json, selection_key


def test_atomic_write_and_hash(tmp_path):
    p = tmp_path / "a" / "b.json"
    atomic_write_text(p, "{}")
    assert p.read_text() == "{}"
    assert list(p.parent.iterdir()) == [p]  # no temp file left behind
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_atomic_files_are_readable_by_others_and_loadable(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.json", '{"a": 1}')
        atomic_torch_save({"w": torch.arange(3)}, tmp_path / "m.pt")
    finally:
        os.umask(mask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
    assert read_json(tmp_path / "x.json") == {"a": 1}
    assert read_json(tmp_path / "missing.json") is None
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.arange(3))


def test_mean_se_and_the_selection_key():
    mean, se, n = mean_se([1.0, 2.0, 3.0, None])
    assert (mean, n) == (2.0, 3) and se == pytest.approx(math.sqrt(1.0 / 3))
    assert mean_se([5.0])[1:] == (0.0, 1)
    assert Cell.of([]).fmt() == "-" and Cell.of([1.0, 3.0]).fmt() == "2.0 ± 1.0"
    # higher accuracy wins; on a tie the lower loss; a non-finite loss loses every tie
    assert selection_key(0.5, 1.0) > selection_key(0.4, 0.1)
    assert selection_key(0.5, 0.9) > selection_key(0.5, 1.0) > selection_key(0.5, float("nan"))


def test_one_worker_runs_jobs_here_and_a_failed_job_raises_at_its_result():
    from benchmarks.runs import worker_pool

    seen = []
    pool = worker_pool(1, seen.append, ("initialised",))
    assert seen == ["initialised"]  # the initializer ran here, before any job
    assert pool.submit(pow, 2, 10).result() == 1024
    failed = pool.submit(int, "not a number")
    with pytest.raises(ValueError):
        failed.result()
