"""The README's commands and Python snippets, run as written.

The main-job command is run from its first ``prefab`` call on (the install before it is
what CI itself does); every other ``bash`` block whose lines are all concrete ``prefab``
commands runs too, and every ``python`` block is executed. The test command must be the
one `.ci/run` calls.
"""

from __future__ import annotations

import re
import shlex
import sys
import types
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
# synopsis lines: placeholders (REF, NAME …), alternatives or optional parts
SYNOPSIS = re.compile(r"\b[A-Z]{2,}\b|\[|\||\.\.\.|…")


def _blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README.read_text()) if lang == language]


def _prefab_commands(command_line: str) -> list[list[str]]:
    return [shlex.split(part)[1:] for part in command_line.split("&&") if part.strip().startswith("prefab ")]


def test_the_test_command_is_the_one_ci_runs() -> None:
    test_command = _blocks("bash")[1].strip()
    assert "pytest" in test_command
    ci_line = test_command.split("pip install", 1)[1]
    assert "pip install" + ci_line in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow
def test_readme_commands_and_snippets_run_as_written(cli, home, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    main_job = _blocks("bash")[0]
    assert "pip install -e ." in main_job
    commands = _prefab_commands(main_job)
    assert commands[0] == ["run", "examples/quickstart.yaml"]
    for block in _blocks("bash")[2:]:
        lines = [line.strip() for line in block.strip().splitlines()]
        if lines and all(line.startswith("prefab ") and not SYNOPSIS.search(line.split("#")[0]) for line in lines):
            commands += [shlex.split(line.split("#")[0])[1:] for line in lines]
    assert any(c[0] == "generate" for c in commands) and any(c[0] == "filter" for c in commands)
    for args in commands:
        result = cli(*args)
        assert result.code == 0, f"prefab {' '.join(args)}: {result.stderr}"
    assert Path("out/demo.trl.jsonl").is_file()

    snippets = _blocks("python")
    assert snippets
    for number, snippet in enumerate(snippets):
        module = types.ModuleType(f"readme_snippet_{number}")  # dataclasses look their module up
        monkeypatch.setitem(sys.modules, module.__name__, module)
        exec(compile(snippet, str(README), "exec"), module.__dict__)  # noqa: S102 - the point of the test

    import factory

    made = factory.generate("shout", "demo", "demo-shout")  # the README's example step, registered above
    assert made["rows_generated"] > 0


def test_readme_recipes_are_valid(tmp_path, home) -> None:
    from factory.catalog import Catalog
    from factory.recipe import load_recipe

    (tmp_path / "seeds").symlink_to(REPO / "examples" / "seeds")
    blocks = _blocks("yaml")
    assert blocks
    for number, block in enumerate(blocks):
        path = tmp_path / f"readme_{number}.yaml"
        path.write_text(block)
        recipe = load_recipe(path, catalog=Catalog(home))
        assert recipe.steps
