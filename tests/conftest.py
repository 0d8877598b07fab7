"""Shared fixtures: a fresh catalog home per test, the real data folder, and a CLI runner."""

from __future__ import annotations

import io
import json
import signal
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

# A throwaway PostgreSQL server (fixtures postgres_dsn, postgres_database) for the team catalog.
pytest_plugins = ["tests.postgres_server"]


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts background jobs with SIGINT ignored; the Ctrl+C tests need Python's own
    # handler whatever the suite was started from.
    signal.signal(signal.SIGINT, signal.default_int_handler)
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_SEEDS = REPO / "examples" / "seeds" / "demo_pairs.jsonl"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it ships beside the repo, not in it)")
    return SHARED_DATA


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "prefab-home"
    monkeypatch.setenv("PREFAB_HOME", str(path))
    # The home's own catalog unless a test names a lake; set (not deleted) so that a value
    # `--catalog` sets in-process is undone after the test.
    monkeypatch.setenv("PREFAB_CATALOG", "")
    return path


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@pytest.fixture
def cli(home: Path):
    """Run ``prefab ARGS`` in-process and capture its exit code and output."""
    from factory.cli import main

    def run(*args: str) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main([str(a) for a in args])
        return CliResult(code, out.getvalue(), err.getvalue())

    return run
