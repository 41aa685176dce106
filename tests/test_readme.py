"""The README's set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

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
    exec(compile(code.replace('weights="DEFAULT"', "weights=None"), "README.md", "exec"), namespace)
    model, groups, opt = namespace["model"], namespace["groups"], namespace["opt"]
    assert [g["name"] for g in groups] == ["stem", "layer1"]
    # the last lines made every block trainable again and wrapped them all
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(opt, torch.optim.Optimizer) and type(opt).__name__ == "AutoRGN"
    assert [g["name"] for g in opt.param_groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    multipliers = opt.multipliers()
    assert multipliers.max() == 1 and (multipliers >= 0).all()
