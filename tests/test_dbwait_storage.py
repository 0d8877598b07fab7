"""Database files stay readable by both DuckDB builds prefab runs on (1.5.x for the lake, 2.x
otherwise), and a file only a newer DuckDB can read is reported with the way out."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from factory.dbwait import PORTABLE_STORAGE, connect_waiting
from schemas.errors import PrefabError


def _never() -> Exception:
    return AssertionError("no other process holds these files")


def test_new_files_are_written_in_the_format_every_duckdb_1_reads(tmp_path: Path):
    path = tmp_path / "catalog.duckdb"
    connection = connect_waiting(path, timeout=1, on_timeout=_never)
    connection.execute("CREATE TABLE t AS SELECT range AS i FROM range(1000)")
    connection.execute("CHECKPOINT")
    connection.close()
    reopened = connect_waiting(path, timeout=1, on_timeout=_never)
    reopened.execute("INSERT INTO t VALUES (-1)")
    (tags,) = reopened.execute(
        "SELECT tags FROM duckdb_databases() WHERE database_name = 'catalog'"
    ).fetchone()
    assert tags["storage_version"] == f"{PORTABLE_STORAGE}+"
    assert reopened.execute("SELECT count(*) FROM t").fetchone() == (1001,)
    reopened.close()


def test_a_file_of_a_newer_duckdb_names_the_conversion(tmp_path: Path, monkeypatch):
    path = tmp_path / "catalog.duckdb"
    path.write_bytes(b"")

    def newer(*args, **kwargs):
        # DuckDB 1.5.5's own words for a file DuckDB 2 wrote.
        raise duckdb.IOException(
            "IO Error: Trying to read a database file with version number 999, but we can only "
            "read versions between 64 and 68.\nThe database file was created with an newer "
            "version of DuckDB."
        )

    monkeypatch.setattr(duckdb, "connect", newer)
    with pytest.raises(PrefabError, match=r"newer DuckDB.*COPY FROM DATABASE old TO new"):
        connect_waiting(path, timeout=1, on_timeout=_never)
