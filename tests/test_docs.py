"""The documentation stays true: docs/cli.md is what the command line says now, the README is a short
front door whose every link exists, and the figure's script still runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    from siso.cli.reference import render

    assert (ROOT / "docs" / "cli.md").read_text() == render(), (
        "docs/cli.md is stale: run `python -m siso.cli.reference docs/cli.md`")


def test_the_reference_covers_every_command_and_option():
    import typer

    from siso.cli import app
    from siso.cli.reference import render

    text = render()
    for name, command in typer.main.get_command(app).commands.items():
        assert f"## `siso {name}`" in text
        for param in command.params:
            if param.name != "help" and param.opts[0].startswith("--"):
                assert f"`{param.opts[0]}`" in text, (name, param.opts[0])


def test_the_readme_is_short_and_its_links_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    links = re.findall(r"\]\((?!https?://|#)([^)#]+)", readme)
    assert {"docs/cli.md", "docs/fidelity.md", "CONTRIBUTING.md", "docs/run-directory.md"} <= set(links)
    for link in links:
        assert (ROOT / link).exists(), link
    for page in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\((?!https?://|#)([^)#]+)", page.read_text()):
            assert (page.parent / link).exists(), f"{page.name}: {link}"


def test_the_test_command_in_the_readme_is_the_one_ci_runs():
    """CI runs the README's test command, with the machine's own torch and Chromium standing in."""
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("python -m venv") and "pytest" in line)
    assert command.endswith('pip install -e ".[test]" && playwright install chromium && python -m pytest')
    assert 'pip install -e ".[test]" && python -m pytest' in (ROOT / ".ci" / "run").read_text()
