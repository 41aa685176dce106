"""The README's set-up commands are the ones CI runs; its snippets run and print what it shows; its
API table shows the real signatures."""

from __future__ import annotations

import contextlib
import inspect
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    test_command = [c for c in commands if "pytest" in c]
    assert len(test_command) == 1, commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command[0].strip() in ci_lines


def test_readme_main_command_names_an_existing_module():
    run_command = [c for c in readme_commands() if "pytest" not in c]
    assert len(run_command) == 1
    module = re.search(r"python -m ([\w.]+)", run_command[0]).group(1)
    path = ROOT / Path(*module.split("."))
    assert (path / "__main__.py").exists() or path.with_suffix(".py").exists(), module


def test_versions_agree():
    import surgical_optim

    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, flags=re.M).group(1)
    assert surgical_optim.__version__ == version
    assert f"## [{version}]" in (ROOT / "CHANGELOG.md").read_text()


def test_quickstart_runs_and_does_what_it_says():
    """The README quickstart, with pretrained weights swapped for random ones (no download here)."""
    import torch

    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.+?)\n```", text, flags=re.S).group(1)
    assert 'weights="DEFAULT"' in code
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace('weights="DEFAULT"', "weights=None"), "README.md", "exec"), namespace)
    model, groups, opt = namespace["model"], namespace["groups"], namespace["opt"]
    # "first": the paper's first block of a ResNet, conv1 + bn1 + layer1
    assert [g["name"] for g in groups] == ["stem", "layer1"]
    assert {id(p) for g in groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if n.startswith(("conv1.", "bn1.", "layer1."))
    }
    # the comment on the print line is the report's first line
    shown = re.search(r"print\(trainable_report\(model\)\)\s+# (.+)", code).group(1)
    assert printed.getvalue().splitlines()[0] == shown
    # model.train() ran: BatchNorm stays in eval, the rest follows the model
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert model.training and batchnorms and not any(m.training for m in batchnorms)
    # the last lines made every block trainable again and wrapped them all
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(opt, torch.optim.Optimizer) and type(opt).__name__ == "AutoRGN"
    assert [g["name"] for g in opt.param_groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    running = {n: b.clone() for n, b in model.named_buffers()}
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    assert all(torch.equal(b, running[n]) for n, b in model.named_buffers())
    multipliers = opt.multipliers()
    assert multipliers.max() == 1 and (multipliers >= 0).all()


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    return text[start : text.index("\n#", start + len(heading))]


def test_block_splits_printed_in_the_readme_are_what_the_snippet_prints():
    """Built on the meta device (sizes only, no weights to initialise), the snippet prints exactly
    the reports the README shows."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    import torch

    blocks = section((ROOT / "README.md").read_text(), "### Blocks")
    code = re.search(r"```python\n(.+?)\n```", blocks, flags=re.S).group(1)
    shown = re.findall(r"```text\n(.+?)\n```", blocks, flags=re.S)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), torch.device("meta"):
        exec(compile(code, "README.md", "exec"), {})
    reports = re.split(r"\n(?=trainable params:)", printed.getvalue().strip())
    assert len(shown) == 4 and reports == shown


def readme_api_rows() -> dict[str, str]:
    """First column of the README's API table: call -> signature as written."""
    text = (ROOT / "README.md").read_text()
    api = text[text.index("## API") :]
    api = api[: api.index("\n## ", 4)]
    rows = re.findall(r"^\| `([A-Za-z_]+)\((.*?)\)` \|", api, flags=re.M)
    return dict(rows)


def _shown(parameter: inspect.Parameter) -> str:
    if parameter.default is inspect.Parameter.empty:
        return parameter.name
    return f"{parameter.name}={parameter.default!r}".replace("'", '"')


@pytest.mark.parametrize(
    "name",
    [
        "param_groups_by_block", "select_blocks", "block_names", "trainable_report", "keep_norm_eval",
        "AutoRGN", "AutoSNR", "per_example_gradient_snr", "adapt_online",
    ],
)
def test_readme_api_table_shows_each_signature_with_its_keyword_only_star(name):
    import surgical_optim

    shown, star = [], False
    for parameter in inspect.signature(getattr(surgical_optim, name)).parameters.values():
        if parameter.name == "rescale":
            continue  # AutoRGN's deprecated spelling of update=
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and not star:
            shown.append("*")
            star = True
        shown.append(_shown(parameter))
    assert readme_api_rows()[name] == ", ".join(shown)


def test_benchmark_results_live_in_their_own_document():
    text = (ROOT / "README.md").read_text()
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert "](benchmarks/RESULTS.md)" in text
    for table_row in ("| gaussian_noise | input |", "| input x_t = A x_s | 6 |", "`AutoRGN(AdamW).step` / `AdamW.step`"):
        assert table_row in results and table_row not in text
    for heading in ("## Set up", "## Quickstart", "## API", "## Pitfalls", "## Integrations", "## Benchmarks"):
        assert heading in text
    order = [text.index(h) for h in ("## Set up", "## Quickstart", "## API", "## Pitfalls", "## Integrations")]
    assert order == sorted(order)
