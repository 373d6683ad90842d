"""README's two commands are what CI runs, and the CLI it describes exists."""

from __future__ import annotations

import re

from .conftest import REPO, run_emseg


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    blocks = _bash_blocks(readme.split("## Two commands", 1)[1].split("\n## ", 1)[0])
    assert len(blocks) == 2, "README must give exactly two set-up-and-run commands"
    run_cmd, test_cmd = blocks
    assert "emseg demo" in run_cmd and "pip install -e ." in run_cmd
    assert "pytest" in test_cmd
    ci_lines = [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    install, *linters, tests = ci_lines
    assert f"{install} && {tests}" == test_cmd  # README's command, the linters run between its two halves
    assert linters == [".venv/bin/ruff check .", ".venv/bin/ruff format --check .", ".venv/bin/mypy"]


def test_every_command_has_help():
    import typer.main

    from emseg.cli import app

    names = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert {"ingest", "info", "show", "demo"} <= set(names)
    readme = (REPO / "README.md").read_text()
    for name in names:
        assert f"emseg {name}" in readme, f"README does not show `emseg {name}`"
    from typer.testing import CliRunner

    runner = CliRunner()
    for name in names:  # every command, in process (seconds), then one in a real process
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "Usage" in result.stdout and f"emseg {name}" in result.stdout, name
    proc = run_emseg(names[-1], "--help")
    assert proc.returncode == 0 and "Usage" in proc.stdout


def test_version_matches_package_metadata():
    from importlib.metadata import version

    import emseg

    assert version("emseg") == emseg.__version__


def test_every_api_name_is_a_function_even_after_importing_all_modules():
    import importlib
    import pkgutil

    import emseg

    for mod in pkgutil.walk_packages(emseg.__path__, "emseg."):
        if mod.name != "emseg.__main__":
            importlib.import_module(mod.name)
    for name in emseg.__all__:
        if name != "__version__":
            assert callable(getattr(emseg, name)) and not isinstance(getattr(emseg, name), type(emseg)), name
