"""Smoke test of ``python -m benchmarks.perf``: it runs on toy sizes and writes well-formed output.

Structure only - never speed: the ratios must be finite positive numbers, not small ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")

from benchmarks import perf  # noqa: E402

EXPECTED_SECTIONS = {"step", "official", "train_step", "scaling_tensors", "scaling_width", "memory"}
HEADINGS = [
    "## 1. Optimizer step",
    "## 2. Official-style statistics",
    "## 3. Whole training step",
    "## 4. Scaling",
    "### vs number of tensors",
    "### vs model size",
    "## 5. Memory",
    "## Targets",
]


def run_perf(tmp_path: Path, *extra: str) -> tuple[int, str, dict]:
    out = tmp_path / "perf.md"
    with torch.random.fork_rng():  # the benchmark seeds the global RNG; leave other tests' alone
        code = perf.main(["--tiny", "--quiet", "--out", str(out), *extra])
    return code, out.read_text(), json.loads(out.with_suffix(".json").read_text())


def ratio_values(rows: list[dict]) -> list[tuple[str, object]]:
    return [(key, value) for row in rows for key, value in row.items() if key.startswith("ratio")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[int, str, dict]:
    return run_perf(tmp_path_factory.mktemp("perf"))


def test_tiny_run_writes_markdown_with_every_section(tiny_run):
    code, markdown, _ = tiny_run
    assert code == 0
    assert markdown.startswith("# surgical-optim wrapper overhead")
    header = markdown.splitlines()[2]
    assert f"torch {torch.__version__}" in header and "device **cpu**" in header and "cores" in header
    positions = [markdown.index(heading) for heading in HEADINGS]
    assert positions == sorted(positions)
    for heading in ("| model | params (M) | tensors | optimizer | variant | median ms | ratio vs bare",
                    "| target | measured | met |"):
        assert heading in markdown


def test_tiny_run_json_structure(tiny_run):
    _, markdown, result = tiny_run
    assert {"machine", "config", "sections", "targets", "sync_debug", "elapsed_s"} <= set(result)
    machine = result["machine"]
    assert machine["device"] == "cpu" and machine["torch"] == torch.__version__ and machine["cpu_count"] >= 1
    sections = result["sections"]
    assert set(sections) == EXPECTED_SECTIONS
    for name, rows in sections.items():
        assert rows, name
    # every JSON row is one table row
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    data_rows = sum(len(rows) for rows in sections.values()) + len(result["targets"])
    header_rows = sum(1 for line in table_rows if line.startswith(("| tensors |", "| width |", "| target |")))
    assert len(table_rows) - header_rows == data_rows

    step_variants = {(r["model"], r["optimizer"]): set() for r in sections["step"]}
    for r in sections["step"]:
        step_variants[(r["model"], r["optimizer"])].add(r["variant"])
    assert {opt for _, opt in step_variants} == set(perf.OPTIMIZERS)
    for variants in step_variants.values():
        assert {"bare", "AutoRGN", "AutoRGN snapshot", "AutoSNR", "AutoSNR calibration"} <= variants
        phases = sorted(v for v in variants if v.startswith("AutoSNR calibration:"))
        assert [p.split(":")[1].split()[:2] for p in phases] == [["step", "1"], ["step", "5"], ["steps", "2-4"]]
    assert {r["variant"] for r in sections["official"]} == {
        "bare Adam(foreach)", "ours AutoRGN(Adam(foreach))",
        "official: weights + rebuild + step", "official: weights only",
    }
    for name in ("train_step", "scaling_tensors", "scaling_width"):
        assert {r["variant"] for r in sections[name]} == {"bare", "AutoRGN", "AutoRGN snapshot", "AutoSNR"}
    assert all("derived_overhead" in r and math.isfinite(r["derived_overhead"]) for r in sections["train_step"])
    assert [r["n_tensors"] for r in sections["scaling_tensors"] if r["variant"] == "bare"] == [4, 16]
    for target in result["targets"]:
        assert set(target) == {"target", "measured", "met"} and isinstance(target["met"], bool)
    assert result["sync_debug"] == {"enabled": False, "guarded_calls": {}, "violations": []}


def test_tiny_run_ratios_are_finite_positive(tiny_run):
    _, _, result = tiny_run
    values = [kv for rows in result["sections"].values() for kv in ratio_values(rows)]
    assert len(values) > 50
    for key, value in values:
        assert isinstance(value, float) and math.isfinite(value) and value >= 0, (key, value)
        if key.startswith("ratio_AutoRGN_fold"):
            assert value == 0.0  # folding keeps no buffer
        else:
            assert value > 0, (key, value)
    for rows in result["sections"].values():
        for row in rows:
            if "median_ms" in row:
                assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0
    # the base of each comparison is exactly 1
    for row in result["sections"]["step"]:
        if row["variant"] == "bare":
            assert row["ratio"] == 1.0


def test_sections_subset(tmp_path):
    code, markdown, result = run_perf(tmp_path, "--sections", "official", "--repeats", "1")
    assert code == 0
    assert set(result["sections"]) == {"official"}
    assert "## 2. Official-style statistics" in markdown and "## 1. Optimizer step" not in markdown


def test_unknown_section_and_missing_cuda_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        perf.main(["--tiny", "--quiet", "--sections", "nope", "--out", str(tmp_path / "x.md")])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA"):
            perf.main(["--tiny", "--quiet", "--device", "cuda", "--out", str(tmp_path / "x.md")])
