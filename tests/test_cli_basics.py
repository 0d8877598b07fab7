"""The command line's entry: `--version`, the command table, and that help and light
commands never import torch or transformers (seconds of CPU on every call)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from factory.cli import COMMAND_MODULES, COMMANDS, build_parser, main
from tests.conftest import DEMO_SEEDS, REPO

HEAVY = ("torch", "transformers", "sentence_transformers")


def _heavy_modules_after(args: list[str], home) -> list[str]:
    """Run ``prefab ARGS`` in a fresh interpreter; the heavy modules it imported."""
    script = (
        "import sys\n"
        "from factory.cli import main\n"
        f"try:\n    code = main({args!r})\nexcept SystemExit as stop:\n    code = stop.code\n"
        "assert code in (0, None), f'exit {code}'\n"
        f"print('HEAVY:' + ' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "PREFAB_HOME": str(home), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.rsplit("HEAVY:", 1)[1].split()


def test_version_prints_the_installed_version(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"prefab {version('prefab')}"


def test_help_lists_every_command_and_an_unknown_one_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, (_, help_line) in COMMANDS.items():
        assert f"{name}" in out and help_line in out
    with pytest.raises(SystemExit) as stop:
        main(["bogus"])
    assert stop.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_command_table_matches_what_the_modules_register() -> None:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    registered = {choice.dest: choice.help for choice in action._choices_actions}
    assert registered == {name: help_line for name, (_, help_line) in COMMANDS.items()}
    # each module registers exactly the commands the table gives it, in the table's order
    for module_name in COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        __import__(module_name, fromlist=["register"]).register(sub, [])
        assert list(sub.choices) == [n for n, (m, _) in COMMANDS.items() if m == module_name]
    assert list(action.choices) == list(COMMANDS)


def test_help_and_light_commands_import_no_torch(tmp_path) -> None:
    home = tmp_path / "home"
    # `filter --help` lists every step's parameters: all step modules load, none may pull torch
    for args in (["--help"], ["filter", "--help"], ["train", "--help"], ["audit", "--help"],
                 ["ingest", str(DEMO_SEEDS), "--name", "demo"], ["catalog", "log", "demo"]):
        assert _heavy_modules_after(args, home) == [], args
